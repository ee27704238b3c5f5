"""The built-in weight sources. Checksums are given only where a publisher states one.

None of the PPGN files could be downloaded on the machines this project was built on, so their
sizes and SHA-256 sums are unknown here; the layer-by-layer shape check of the converters is what
guards them. The Caffe model zoo publishes a SHA-1 for the reference CaffeNet.
"""

from __future__ import annotations

from advpurify.weights.registry import Source, describe_model, register_group, register_source

HF_DEEPSIM = "https://huggingface.co/binxu/DeePSim_DosovitskiyBrox2016/resolve/main"

describe_model("deepsim-fc6", "DeePSiM fc6 generator G (Dosovitskiy & Brox 2016), PPGN's prior")
describe_model("caffenet-fc6", "BVLC reference CaffeNet up to fc6, PPGN's encoder E")

register_source(
    Source(
        name="deepsim-fc6-caffe",
        provides="deepsim-fc6",
        format="caffemodel",
        url="http://s.anhnguyen.me/181007__generator.caffemodel",
        filename="generator.caffemodel",
        converter="advpurify.models.deepsim:convert_weights",
        description="generator.caffemodel (Evolving-AI-Lab/ppgn, noiseless PPGN-h)",
    )
)
register_source(
    Source(
        name="deepsim-fc6-torch",
        provides="deepsim-fc6",
        format="torch",
        url=f"{HF_DEEPSIM}/upconvGAN_fc6.pt",
        converter="advpurify.models.deepsim:convert_weights",
        description="PyTorch port (binxu/DeePSim_DosovitskiyBrox2016); equality to PPGN's "
        "generator unverified",
    )
)
register_source(
    Source(
        name="deepsim-fc6-safetensors",
        provides="deepsim-fc6",
        format="safetensors",
        converter="advpurify.models.deepsim:convert_weights",
        description="a file written by `advpurify weights convert`",
    )
)
register_source(
    Source(
        name="caffenet-fc6-caffe",
        provides="caffenet-fc6",
        format="caffemodel",
        url="http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel",
        sha1="4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46",  # Caffe model zoo readme
        converter="advpurify.models.caffenet:convert_weights",
        description="bvlc_reference_caffenet.caffemodel (BVLC model zoo)",
    )
)
register_source(
    Source(
        name="caffenet-fc6-torch",
        provides="caffenet-fc6",
        format="torch",
        url=f"{HF_DEEPSIM}/caffenet.pt",
        converter="advpurify.models.caffenet:convert_weights",
        description="PyTorch port of CaffeNet (binxu/DeePSim_DosovitskiyBrox2016)",
    )
)
register_source(
    Source(
        name="caffenet-fc6-safetensors",
        provides="caffenet-fc6",
        format="safetensors",
        converter="advpurify.models.caffenet:convert_weights",
        description="a file written by `advpurify weights convert`",
    )
)
register_group(
    "ppgn",
    ("deepsim-fc6", "caffenet-fc6"),
    description="everything `--method ppgn` needs: generator G and encoder E",
)
