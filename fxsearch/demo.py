"""`make demo`: convert the built-in ResNet-8, show the rewritten graph and its search summary,
train the search for a few steps on random data and finalize the result.

(The full search on a bundled dataset arrives with the search driver.)
"""
from __future__ import annotations

import torch

import fxsearch
from fxsearch.zoo import resnet8


def main() -> None:
    torch.manual_seed(0)
    model = resnet8(num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    sm = fxsearch.convert(model, (x,))
    print("== rewritten graph (fx code) ==")
    print(sm.code)
    print("== search summary ==")
    print(sm.summary())
    opt_w = torch.optim.Adam(sm.weight_parameters(), lr=1e-3)
    opt_a = torch.optim.SGD(sm.arch_parameters(), lr=1e-2, momentum=0.9)
    target = torch.randint(0, 10, (8,))
    sm.train()
    for step in range(5):
        loss = torch.nn.functional.cross_entropy(sm(x), target)
        opt_w.zero_grad()
        opt_a.zero_grad()
        loss.backward()
        opt_w.step()
        opt_a.step()
        print(f"step {step}: task loss {loss.item():.4f}")
    final = fxsearch.finalize(sm)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in final.parameters())
    print(f"== finalized: {before} -> {after} parameters (BatchNorm folded) ==")
    print(final.code)


if __name__ == "__main__":
    main()
