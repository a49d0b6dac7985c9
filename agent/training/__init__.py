"""Central (offline) training and evaluation: what produces the IFER export and the initial ``v``.

* :mod:`~fedfer.agent.training.data`: dataset readers (ImageFolder faces, the CREMA-D layout) and splits;
  :mod:`~fedfer.agent.training.augment`: face augmentation;
* :mod:`~fedfer.agent.training.ifer`: training ``g`` (and f's last blocks);
  :mod:`~fedfer.agent.training.recipe`: the benchmark's IFER recipe and its model cache;
  :mod:`~fedfer.agent.training.calibrate`: class-bias calibration of ``g``;
  :mod:`~fedfer.agent.training.checkpoint`: per-epoch checkpoints that let a run resume;
* :mod:`~fedfer.agent.training.vfer`: training the video model ``v`` on labelled clips;
  :mod:`~fedfer.agent.training.clips` and :mod:`~fedfer.agent.training.crema`: the clip path (clips →
  features → ``v``, per-subject personalization experiments);
  :mod:`~fedfer.agent.training.simulate`: simulated subjects;
* :mod:`~fedfer.agent.training.peer`: the published peer (mini-Xception);
  :mod:`~fedfer.agent.training.metrics`: the paper's tables;
  :mod:`~fedfer.agent.training.cached`: the content-addressed cache of computed arrays.

The networks themselves are :mod:`fedfer.agent.models`; on-device learning is :mod:`fedfer.agent.learning`.
"""

__all__: list[str] = []
