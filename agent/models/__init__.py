"""The networks and the files that carry them.

* :mod:`~fedfer.agent.models.mobilenet`: MobileNetV2 ``f`` (torchvision-identical state-dict keys);
  :mod:`~fedfer.agent.models.extractor`: ``f`` as the device runs it, built from a weight file;
  :mod:`~fedfer.agent.models.tflite`: real ImageNet weights for ``f`` from the quantized TFLite model;
* :mod:`~fedfer.agent.models.ifer`: IFER ``g(f(x))``: the head ``g``, the network ``FaceNet`` and its export;
* :mod:`~fedfer.agent.models.video`: the video model ``v`` and its named arrays (what travels);
* :mod:`~fedfer.agent.models.weights`: pinned model files (download, SHA-256 verification);
  :mod:`~fedfer.agent.models.export`: exported models (named arrays + manifest) and content digests;
  :mod:`~fedfer.agent.models.provision`: model files installed into a service's asset folder.
"""

__all__: list[str] = []
