#!/usr/bin/env python
"""Train and evaluate TOOD (or any Detectron2 model) described by a LazyConfig file or a YAML config.

A LazyConfig (configs/*.py): Detectron2's tools/lazyconfig_train_net.py with TOOD's options and checks (see
``tood.engine.training``): ``train.amp`` (bfloat16 on CPU), ``train.clip_grad``, ``train.device``,
``--register-coco``, epoch-counted schedules, clear errors for unknown keys, datasets, weights and non-finite
losses, atomic checkpoints and exact ``--resume``. Without CUDA, ``--num-gpus N`` starts N CPU processes.
A YAML config (configs/COCO-Detection/*.yaml): Detectron2's tools/train_net.py with ``tood.engine.Trainer``
(see ``tood.engine.defaults``); overrides are KEY VALUE pairs. Flags go before the overrides.

Examples::

    tools/train_net.py --config-file configs/tood_R_50_1x.py --num-gpus 8
    tools/train_net.py --config-file configs/tood_R_50_1x.py --num-gpus 8 --resume
    tools/train_net.py --config-file configs/tood_R_50_1x.py --eval-only train.init_checkpoint=model_final.pth
    tools/train_net.py --config-file configs/COCO-Detection/tood_R_50_FPN_1x.yaml --num-gpus 8
    tools/train_net.py --config-file configs/COCO-Detection/tood_R_50_FPN_1x.yaml --eval-only \\
        MODEL.WEIGHTS output/model_final.pth
    tools/train_net.py --config-file configs/quickstart_shapes.py \\
        --register-coco mine_train mine/train.json mine/images --register-coco mine_val mine/val.json mine/images \\
        dataloader.train.dataset.names=mine_train dataloader.test.dataset.names=mine_val model.num_classes=3
"""

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets
from tood.engine import argument_parser, launch_from_args, main

if __name__ == "__main__":
    launch_from_args(main, argument_parser(epilog="Examples:" + __doc__.split("Examples::", 1)[1]).parse_args())
