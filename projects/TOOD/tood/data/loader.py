"""The training data loader of TOOD's configs: Detectron2's, able to continue a resumed run's sample stream and to
replace the images its mapper skips."""

import itertools

from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from torch.utils.data import Sampler

from ..compat import MapDataset

__all__ = ["build_train_loader"]


class _SkipSampler(Sampler):
    """The indices of ``sampler`` after its first ``skip``."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def build_train_loader(dataset, *, mapper, total_batch_size: int, start_iter: int = 0, **kwargs):
    """``build_detection_train_loader`` over a :class:`TrainingSampler` that starts at batch ``start_iter``, with
    :class:`tood.compat.MapDataset` (for ``CheckedDatasetMapper(on_bad_image="skip")``).

    tools/train_net.py sets ``start_iter`` when it resumes, so that the resumed run reads the images the
    uninterrupted run would have read from that iteration on (exactly so when all images fall into one aspect-ratio
    group: grouping otherwise reorders images within a few batches), rather than the start of the stream again.

    Args:
        dataset: a list of dataset dicts.
        mapper, total_batch_size, kwargs: as ``build_detection_train_loader``.
        start_iter: number of batches of the stream to skip; only indices are skipped, no image is read.
    """
    sampler = TrainingSampler(len(dataset))
    if start_iter:
        sampler = _SkipSampler(sampler, start_iter * (total_batch_size // comm.get_world_size()))
    dataset = MapDataset(DatasetFromList(dataset, copy=False), mapper)
    return build_detection_train_loader(
        dataset, mapper=None, sampler=sampler, total_batch_size=total_batch_size, **kwargs
    )
