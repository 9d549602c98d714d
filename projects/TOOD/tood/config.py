"""OmegaConf resolvers that TOOD's LazyConfig files use."""

from omegaconf import OmegaConf


def schedule_fraction(total_iters, numerator, denominator) -> int:
    """``total_iters * numerator // denominator``: e.g. the ATSS warm-up is the first 4/12 of a schedule."""
    return int(total_iters) * int(numerator) // int(denominator)


def register_resolvers():
    # "${tood_schedule_fraction:${train.max_iter},4,12}" keeps the warm-up a fraction of the schedule
    # when train.max_iter is overridden on the command line.
    OmegaConf.register_new_resolver("tood_schedule_fraction", schedule_fraction, replace=True)
