"""The network: ``unet.build_model(config)`` and the per-platform 3x3x3 convolution ``conv.conv3d``."""
