"""Attribution on bitsandbytes-quantized models: the 4-bit weight as the CPU kernel packs it
(`actors.quantized`), and estimates through the packed kernel against the same model run in
float32 with that weight."""

import pytest
import torch

from actors import load_model
from actors.attribution import Attributor
from actors.quantized import dequantized_weight
from actors.targets import encode_program
from orchestrator.tasks import iter_programs
from tests.tiny import save_tiny_model

pytest.importorskip("bitsandbytes")
SITES = ["resid_pre", "attn_head", "mlp_out"]


def linears_4bit(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def estimates(lm, pairs) -> torch.Tensor:
    out = []
    for batch in Attributor(lm, batch_size=len(pairs)).estimate(pairs, SITES):
        out.extend(v.flatten() for _, v in sorted(batch.cells.items()))
    return torch.cat(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("q") / "llama", "llama", n_layers=3)


def test_the_packed_weight_is_the_one_the_kernel_uses(folder) -> None:
    lm = load_model(str(folder), quantization="nf4")
    module = next(iter(linears_4bit(lm.model).values()))
    before = dequantized_weight(module)  # bitsandbytes' own dequantization, not yet packed
    x = torch.randn(2, 5, module.in_features)
    with torch.no_grad():
        y = module(x)  # packs the weight where the CPU kernel wants it
    after = dequantized_weight(module)
    # The packing keeps the scales in bfloat16 (relative 2^-8), and the kernel computes in it.
    torch.testing.assert_close(after, before, rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(y, x @ after.T, rtol=0.0, atol=2e-2 * float(y.abs().max()))


def test_estimates_through_the_packed_kernel_are_the_dequantized_models(folder) -> None:
    quantized = load_model(str(folder), quantization="nf4")
    pairs = [encode_program(quantized.tokenizer, p) for p in iter_programs("binding", 5, 6, 3)]
    with torch.no_grad():  # a forward without gradients first: the weights get packed
        quantized.model(input_ids=torch.tensor([pairs[0].clean_ids]))
    layers = linears_4bit(quantized.model)
    # (Where the CPU lacks AVX512-BF16 nothing is packed, and bitsandbytes' backward serves.)
    assert all(
        m.weight.quant_state.packing_format_for_cpu
        for m in layers.values()
        if getattr(m, "support_avx512bf16_for_cpu", False)
    )
    got = estimates(quantized, pairs)
    plain = load_model(str(folder), dtype="float32")
    modules = dict(plain.model.named_modules())
    with torch.no_grad():
        for name, module in layers.items():
            modules[name].weight.copy_(dequantized_weight(module))
    want = estimates(plain, pairs)
    # The 4-bit model computes in bfloat16: equal up to its rounding, and far from it were the
    # gradient taken through the wrong weight (a transposed one, measured: 0.19).
    assert float(torch.corrcoef(torch.stack([got, want]))[0, 1]) > 0.995
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.05 * float(want.abs().max()))


def test_int8_models_pass_gradients_back(folder) -> None:
    lm = load_model(str(folder), quantization="int8")
    pairs = [encode_program(lm.tokenizer, p) for p in iter_programs("binding", 5, 6, 2)]
    values = estimates(lm, pairs)
    assert torch.isfinite(values).all() and values.abs().max() > 0
