"""AWS Inferentia2 / Trainium through torch-neuronx."""

from __future__ import annotations

from typing import ClassVar

from .base import Backend, Probe, device_nodes, installed_versions


class NeuronBackend(Backend):
    name: ClassVar[str] = "neuron"
    torch_device: ClassVar[str] = "xla"
    env_vars: ClassVar[tuple[str, ...]] = (
        "NEURON_CC_FLAGS",
        "NEURON_RT_NUM_CORES",
        "NEURON_RT_VISIBLE_CORES",
        "NEURON_COMPILE_CACHE_URL",
        "OMP_NUM_THREADS",
    )

    def _probe_impl(self) -> Probe:
        nodes = device_nodes(r"neuron\d+")
        if not nodes:
            return Probe(False, "no Neuron device nodes (/dev/neuron*)")
        # PyPI's torch-neuronx 1.0 is a placeholder that raises on import: importing for real
        # is the only honest probe.
        import torch_neuronx  # noqa: F401

        return Probe(True, "", len(nodes))

    def device_name(self) -> str:
        try:
            with open("/sys/devices/virtual/dmi/id/product_name") as f:
                product = f.read().strip()
        except OSError:
            product = ""
        return "inf2" if product.startswith("inf2") else ("trn1" if "trn" in product else "inf2")

    def versions(self) -> dict[str, str]:
        return installed_versions(
            "torch-neuronx", "neuronx-cc", "libneuronxla", "transformers-neuronx"
        )
