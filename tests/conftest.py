"""The tests run on the devices the program uses: on a CPU, one JAX device per core
(``cowjax.devices.use_cpu_cores``), so the sharded paths (train step, inference windows) are the ones
tested."""

from cowjax import devices

devices.use_cpu_cores()
