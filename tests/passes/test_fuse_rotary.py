import torch

from llmcompile import ops
from llmcompile.passes.fuse_rotary import RULES
from llmcompile.testing import assert_declines, check_rewrite

B, H, S, E = 2, 4, 6, 16


def inputs():
    torch.manual_seed(0)
    angles = torch.randn(B, 1, S, E // 2).repeat(1, 1, 1, 2)
    return torch.randn(B, S, H * E), angles.cos(), angles.sin()


def heads(x):
    # [B, S, H * E] -> [B, H, S, E] as Llama's attention does: the head dim is static
    return x.view(*x.shape[:-1], H, E).transpose(1, 2)


def rotate_half(x):  # transformers' rotate_half
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def test_rotary_llama_spelling():
    def before(x, cos, sin):
        q = heads(x)
        return (q * cos) + (rotate_half(q) * sin)

    def expected(x, cos, sin):
        return ops.rotary(heads(x), cos, sin)

    check_rewrite(RULES, before, expected, inputs(), count={"rotary": 1})


def test_rotary_declines_off_centre_split():
    def before(x, cos, sin):
        q = heads(x)
        rotated = torch.cat((-q[..., 4:], q[..., :4]), dim=-1)
        return q * cos + rotated * sin

    assert_declines(RULES, before, inputs(), rule="rotary", reason="not at the middle")


def test_interleaved_rotary_declines_with_reason():
    def gptj(x, cos, sin):  # transformers' GPT-J apply_rotary_pos_emb (cos/sin already repeated)
        x = heads(x)
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return (x * cos) + (rotated * sin)

    stats = assert_declines(RULES, gptj, inputs(), rule="rotary_interleaved",
                            reason="rotate_every_two")
    assert stats.total == 0
