"""Write a rule, unit-test it, and use it in a recipe: the third way to use llmcompile.

    python examples/custom_rule.py

The rule: transformers' GELU-tanh is often written out by hand; replace it with the ATen op.
"""

import math

import torch

import llmcompile
from llmcompile import Recipe, Reject, Rule, RuleSet, UserRules
from llmcompile.passes.fusion import FuseConfig
from llmcompile.testing import assert_declines, check_rewrite


# 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  ==>  gelu(x, approximate="tanh")
def gelu_by_hand(x, c: float, k: float):
    return 0.5 * x * (1.0 + torch.tanh(c * (x + k * torch.pow(x, 3.0))))


def constants_are_gelu_tanh(m) -> Reject | None:
    if not (m.is_constant("c") and m.is_constant("k")):
        return Reject("GELU constants are not compile-time constants")
    if abs(m["c"] - math.sqrt(2.0 / math.pi)) > 1e-6 or abs(m["k"] - 0.044715) > 1e-9:
        return Reject(f"constants {m['c']:.6g}, {m['k']:.6g} are not GELU-tanh's")
    return None


def gelu_op(x, c: float, k: float):
    return torch.nn.functional.gelu(x, approximate="tanh")


RULES = RuleSet("my_rules", [Rule("gelu_tanh", gelu_by_hand, gelu_op,
                                  check=constants_are_gelu_tanh)])


def test_my_rule():
    x = (torch.randn(4, 16),)
    c = math.sqrt(2.0 / math.pi)

    def before(x):
        return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))

    def expected(x):
        return torch.nn.functional.gelu(x, approximate="tanh")

    check_rewrite(RULES, before, expected, x, count=1)  # count, structure, numerics

    def not_gelu(x):  # a different constant: must decline, and say why
        return 0.5 * x * (1.0 + torch.tanh(0.9 * (x + 0.044715 * torch.pow(x, 3.0))))

    assert_declines(RULES, not_gelu, x, rule="gelu_tanh", reason="are not GELU-tanh's")


def main() -> None:
    test_my_rule()
    print("rule unit tests passed")

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            h = self.up(x)
            c = math.sqrt(2.0 / math.pi)
            return self.down(0.5 * h * (1.0 + torch.tanh(c * (h + 0.044715 * torch.pow(h, 3.0)))))

    model = MLP().eval()
    recipe = Recipe((FuseConfig(), UserRules(rules=RULES)), name="with-my-rules")
    for report in llmcompile.explain(model, recipe, example_inputs=(torch.randn(2, 16),)):
        print(report.format())
    compiled = llmcompile.compile(model, recipe)
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    print("compiled model matches eager")


if __name__ == "__main__":
    main()
