"""Hooks of TOOD's training tools."""

from detectron2.engine import HookBase
from tqdm import tqdm

__all__ = ["ProgressBar"]


class ProgressBar(HookBase):
    """A tqdm bar over the training iterations: rate, ETA and the latest total loss.

    After training, ``seconds`` and ``iterations`` are the wall time and the number of the iterations this run
    trained (from ``start_iter``, hooks included).
    """

    seconds = iterations = 0

    def before_train(self):
        self._bar = tqdm(
            total=self.trainer.max_iter, initial=self.trainer.start_iter, desc="training", unit="it", smoothing=0.05
        )

    def after_step(self):
        self._bar.update(1)
        history = self.trainer.storage.histories().get("total_loss")
        if history is not None:
            self._bar.set_postfix(loss=f"{history.latest():.3f}", refresh=False)

    def after_train(self):
        self.seconds = self._bar.format_dict["elapsed"]
        self.iterations = self._bar.n - self._bar.initial
        self._bar.close()
