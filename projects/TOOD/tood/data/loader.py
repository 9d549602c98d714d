"""The training data loader of TOOD's configs: Detectron2's, able to continue a resumed run's sample stream and to
replace the images its mapper skips."""

import itertools
import random

from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

__all__ = ["SkippingMapDataset", "build_train_loader"]


class SkippingMapDataset(Dataset):
    """Detectron2's MapDataset: ``map_func(dataset[i])``, and where that is None (an image the mapper skipped),
    the mapping of another random item that is not known to be skipped.

    Detectron2 0.6's own draws the other item with ``random.sample`` from a set, which Python 3.11 refuses.
    """

    def __init__(self, dataset, map_func):
        self._dataset = dataset
        self._map_func = map_func
        self._rng = random.Random(42)
        self._skipped = set()

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, idx):
        index = int(idx)
        while True:
            data = self._map_func(self._dataset[index])
            if data is not None:
                return data
            self._skipped.add(index)
            if len(self._skipped) == len(self):
                raise RuntimeError(f"The mapper skipped every one of the {len(self)} images")
            while index in self._skipped:
                index = self._rng.randrange(len(self))


class _SkipSampler(Sampler):
    """The indices of ``sampler`` after its first ``skip``."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def build_train_loader(dataset, *, mapper, total_batch_size: int, start_iter: int = 0, **kwargs):
    """``build_detection_train_loader`` over a :class:`TrainingSampler` that starts at batch ``start_iter``, with
    :class:`SkippingMapDataset` (for ``CheckedDatasetMapper(on_bad_image="skip")``).

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
    dataset = SkippingMapDataset(DatasetFromList(dataset, copy=False), mapper)
    return build_detection_train_loader(
        dataset, mapper=None, sampler=sampler, total_batch_size=total_batch_size, **kwargs
    )
