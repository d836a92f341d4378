"""Benchmark shapes: the lm_head yardsticks of docs/design.md §3, by name, plus custom ones.

A shape is (H, V, N): hidden size, vocabulary size, number of tokens in the batch. The tokens are laid
out as B sequences of T tokens (N = B * T); the RL ops group the B sequences into prompts of
``group_size`` rollouts each.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    H: int
    V: int
    N: int

    @property
    def label(self) -> str:
        return f"{self.name} N={self.N}"


# name -> (H, V, token counts of the yardstick table; the first is the default)
NAMED: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "llama3-8b": (4096, 128256, (8192, 32768)),
    "qwen2.5-7b": (3584, 152064, (8192, 32768)),
    "gemma2-2b": (2304, 256000, (8192,)),
    "qwen2.5-0.5b": (896, 151936, (32768,)),
    "qwen3.5-27b": (5120, 248320, (8192,)),      # the newest large-vocabulary head
    # small shapes for CPU smoke runs and CI (not yardsticks)
    "tiny": (64, 1000, (256,)),
    "small": (256, 8192, (1024,)),
}

YARDSTICK_SHAPES = ("llama3-8b", "qwen2.5-7b", "gemma2-2b", "qwen2.5-0.5b", "qwen3.5-27b")


def parse_ints(text: str | None) -> list[int]:
    if text is None or str(text).strip() == "":
        return []
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def resolve_shapes(names: str | None, H: int | None = None, V: int | None = None,
                   N: str | None = None) -> list[Shape]:
    """Shapes from a comma list of names (``"all"`` = the yardstick table), ``--N`` (a comma list of
    token counts that overrides each named shape's default, ``"table"`` = every count the table lists),
    and a custom ``--H --V`` shape (added when both are given; its N comes from ``--N``, default 1024)."""
    out: list[Shape] = []
    Ns_all = str(N).strip().lower() == "table" if N is not None else False
    Ns = [] if Ns_all else parse_ints(N)
    for name in [s for s in (names or "").replace(" ", "").split(",") if s]:
        if name == "all":
            for n in YARDSTICK_SHAPES:
                out.extend(_named(n, Ns, Ns_all))
            continue
        if name not in NAMED:
            raise ValueError(f"unknown shape {name!r}; known: {', '.join(NAMED)} (or use --H --V --N)")
        out.extend(_named(name, Ns, Ns_all))
    if (H is None) != (V is None):
        raise ValueError("a custom shape needs both --H and --V")
    if H is not None:
        for n in Ns or [1024]:
            out.append(Shape(f"custom-H{H}-V{V}", int(H), int(V), int(n)))
    # keep order, drop duplicates
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def _named(name: str, Ns: list[int], table: bool) -> list[Shape]:
    H, V, default_Ns = NAMED[name]
    counts = list(default_Ns) if table else (Ns or [default_Ns[0]])
    return [Shape(name, H, V, n) for n in counts]


def layout(N: int, seq_len: int | None, group_size: int) -> tuple[int, int, int]:
    """(B, T, G): B sequences of T tokens with N = B * T, and rollouts per prompt G (G divides B).

    T defaults to min(N, 512). N must be a multiple of T."""
    T = min(N, seq_len or 512)
    if N % T:
        raise ValueError(f"N={N} is not a multiple of the sequence length T={T} (set --seq-len)")
    B = N // T
    G = max(1, min(group_size, B))
    while B % G:
        G -= 1
    return B, T, G
