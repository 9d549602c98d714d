"""The studies behind docs/: ``tools/accuracy_study.py`` and ``tools/analyze_alignment.py`` parse arguments and call
these.

* :mod:`.accuracy`: detectors trained and compared under one protocol (optimiser sweep, seeds, matched
  post-processing).
* :mod:`.alignment_report`: how well each detector's scores rank its own boxes, as a table, a scatter plot and maps.
"""
