"""Channel atoms: the algebra the coupled-dimension analysis works in.

Every axis of every tensor is an `Atom` of its size. Atoms are unified (union-find) when two axes
must carry the same channels (an elementwise add, a linear's input and its weight's columns), and
*refined* when one axis turns out to be made of smaller ones:

  * product — a reshape [.., 576] -> [.., 9, 64] refines the 576-atom into (9 x 64), row-major;
  * sum     — a concat / split along an axis refines it into consecutive parts.

Refinement happens at the root of a class, so every axis in the class sees it. An axis is thus a
tree of sums and products over leaf atoms; a group of the final analysis is one leaf class, and
channel c of it owns, in each tensor axis, the positions whose coordinate for that leaf is c
(`positions`). Alignment works on `expand`, the axis as consecutive row-major products.

Termination: a refinement replaces an atom by strictly smaller ones (products never use size-1
factors), so the number of leaves is bounded by the total axis size; unification only merges
classes. Nothing grows, whatever the graph (RoPE's slice/neg/cat included).

A leaf carries `reasons` (why it must not be pruned), `inexact` notes (prunable, but removing a
channel changes the output even if it was zero: softmax/top-k over experts) and `tags` (what the
rules saw: attention heads, norm features, ...), all merged on union and inherited on refinement.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

Term = list["Atom"]  # product of leaves, row-major (first = slowest)


class Atom:
    _ids = itertools.count()
    __slots__ = ("id", "size", "parent", "kind", "parts", "reasons", "inexact", "tags")

    def __init__(self, size: int, reasons: Iterable[str] = (), tags: dict | None = None):
        self.id = next(Atom._ids)
        self.size = int(size)
        self.parent: Atom | None = None
        self.kind: str | None = None  # None (leaf), "prod" or "sum"
        self.parts: list[Atom] | None = None
        self.reasons: set[str] = set(reasons)
        self.inexact: set[str] = set()
        self.tags: dict[str, object] = dict(tags or {})

    def __repr__(self) -> str:
        r = find(self)
        if r.parts is None:
            return f"a{r.id}({r.size})"
        sep = "x" if r.kind == "prod" else "+"
        return "(" + sep.join(repr(p) for p in r.parts) + ")"


def find(a: Atom) -> Atom:
    root = a
    while root.parent is not None:
        root = root.parent
    while a.parent is not None and a.parent is not root:
        a.parent, a = root, a.parent
    return root


def expand(a: Atom) -> list[Term]:
    """`a` as consecutive blocks (a sum) of row-major products, for alignment.

    Only the leading factor of a product distributes: [A+B] x C is A x C then B x C, but in
    A x [B+C] the B and C positions interleave, so a sum in a later factor stays one
    pseudo-leaf (its root atom) in the term."""
    r = find(a)
    if r.parts is None:
        return [[r]]
    if r.kind == "sum":
        return [t for p in r.parts for t in expand(p)]
    rest: Term = []
    for p in r.parts[1:]:
        rest += _factors(p)
    return [t + rest for t in expand(r.parts[0])]


def _factors(a: Atom) -> Term:
    r = find(a)
    if r.parts is None or r.kind == "sum":
        return [r]
    return [f for p in r.parts for f in _factors(p)]


def leaves(a: Atom) -> list[Atom]:
    """Every leaf root under `a` (descending into sums and products alike)."""
    out: dict[int, Atom] = {}
    stack = [a]
    while stack:
        r = find(stack.pop())
        if r.parts is None:
            out.setdefault(r.id, r)
        else:
            stack.extend(reversed(r.parts))
    return list(out.values())


def positions(a: Atom) -> dict[int, tuple["Atom", "torch.Tensor"]]:
    """For each leaf under `a`: (leaf, index[leaf.size, k]) — the positions channel c owns along
    the axis `a` lays out. A leaf that meets itself inside one product (a diagonal) is blocked."""
    import torch

    r = find(a)
    if r.parts is None:
        return {r.id: (r, torch.arange(r.size)[:, None])}
    if r.kind == "sum":
        acc: dict[int, tuple[Atom, list]] = {}
        off = 0
        for p in r.parts:
            for lid, (leaf, pos) in positions(p).items():
                acc.setdefault(lid, (leaf, []))[1].append(pos + off)
            off += find(p).size
        return {lid: (leaf, torch.cat(ps, dim=1)) for lid, (leaf, ps) in acc.items()}
    sizes = [find(p).size for p in r.parts]
    strides = []
    s = r.size
    for z in sizes:
        s //= z
        strides.append(s)
    subs = [positions(p) for p in r.parts]
    seen: dict[int, int] = {}
    for i, sub in enumerate(subs):
        for lid, (leaf, _) in sub.items():
            if lid in seen and seen[lid] != i:
                leaf.reasons.add("the same channels meet twice in one product axis")
            seen.setdefault(lid, i)
    out: dict[int, tuple[Atom, torch.Tensor]] = {}
    for i, sub in enumerate(subs):
        others = torch.zeros(1, dtype=torch.long)
        for j, z in enumerate(sizes):
            if j != i:
                others = (others[:, None] + torch.arange(z)[None, :] * strides[j]).reshape(-1)
        for lid, (leaf, pos) in sub.items():
            full = (pos[:, :, None] * strides[i] + others[None, None, :]).reshape(pos.shape[0], pos.shape[1] * others.numel())
            if lid in out:
                out[lid] = (leaf, torch.cat([out[lid][1], full], dim=1))
            else:
                out[lid] = (leaf, full)
    return out


def term_size(t: Term) -> int:
    out = 1
    for leaf in t:
        out *= leaf.size
    return out


def block(a: Atom | None, reason: str) -> None:
    if a is None:
        return
    for leaf in leaves(a):
        leaf.reasons.add(reason)


def mark_inexact(a: Atom | None, reason: str) -> None:
    if a is None:
        return
    for leaf in leaves(a):
        leaf.inexact.add(reason)


def tag(a: Atom | None, key: str, value: object = True) -> None:
    if a is None:
        return
    for leaf in leaves(a):
        leaf.tags.setdefault(key, value)


def make(kind: str, parts: list[Atom | None]) -> Atom | None:
    """A fresh composite atom (product or sum of `parts`).

    None parts are dropped, size-1 parts from products (they carry no channel) and size-0 parts from
    sums: an empty tensor (a concat's `t[:, :0]`, a zero-length split) occupies no position of the
    axis, so it takes no part in its layout. Kept, an empty leaf inside a product would be a term
    of size 0 that no alignment can split and `positions` could not lay out."""
    parts = [p for p in parts if p is not None and (p.size > 0 if kind == "sum" else p.size > 1)]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    size = 1 if kind == "prod" else 0
    for p in parts:
        size = size * p.size if kind == "prod" else size + p.size
    a = Atom(size)
    a.kind, a.parts = kind, parts
    return a


_REFINES = [0]  # bumped on every refinement: alignment re-expands after one


def _refine(leaf: Atom, kind: str, sizes: list[int]) -> list[Atom]:
    """Turn leaf root `leaf` into a product/sum of fresh leaves that inherit its marks."""
    assert leaf.parts is None and leaf.parent is None
    _REFINES[0] += 1
    parts = []
    for s in sizes:
        p = Atom(s, leaf.reasons, leaf.tags)
        p.inexact = set(leaf.inexact)
        parts.append(p)
    leaf.kind, leaf.parts = kind, parts
    return parts


def _union(a: Atom, b: Atom) -> Atom:
    """Make `b` the root of `a`'s class; `a` and `b` are roots. Marks move to every leaf of `b`."""
    a.parent = b
    if b.parts is None:
        b.reasons |= a.reasons
        b.inexact |= a.inexact
        for k, v in a.tags.items():
            b.tags.setdefault(k, v)
    else:
        for leaf in leaves(b):
            leaf.reasons |= a.reasons
            leaf.inexact |= a.inexact
            for k, v in a.tags.items():
                leaf.tags.setdefault(k, v)
    return b


def unify(a: Atom | None, b: Atom | None, why: str = "") -> bool:
    """Declare that `a` and `b` carry the same channels in the same order. False if impossible
    (then every leaf involved is blocked with a reason naming `why`)."""
    if a is None and b is None:
        return True
    if a is None or b is None:
        return True  # a size-1 (broadcast) axis carries no channels
    ra, rb = find(a), find(b)
    if ra is rb:
        return True
    if ra.size != rb.size:
        msg = f"{why}: axes of sizes {ra.size} and {rb.size} meet"
        block(ra, msg)
        block(rb, msg)
        return False
    if ra.parts is None:
        _union(ra, rb)
        return True
    if rb.parts is None:
        _union(rb, ra)
        return True
    ok = _align(ra, rb, why)
    ra, rb = find(ra), find(rb)
    if ra is not rb:
        ra.parent = rb  # both now expand to the same leaves (or were blocked)
    return ok


def _fail(ta: list[Term], tb: list[Term], why: str) -> bool:
    msg = f"{why}: layouts {_fmt(ta)} and {_fmt(tb)} cannot be matched channel by channel"
    for t in [*ta, *tb]:
        for f in t:
            for leaf in leaves(f):
                leaf.reasons.add(msg)
    return False


def _fmt(terms: list[Term]) -> str:
    return "+".join("x".join(str(leaf.size) for leaf in t) for t in terms)


def _first_big(t: Term) -> int:
    for i, leaf in enumerate(t):
        if leaf.size > 1:
            return i
    return -1


def _split_term(t: Term, offset: int) -> bool:
    """Refine the leading factor of product `t` so that a part boundary falls at `offset`."""
    i = _first_big(t)
    if i < 0:
        return False
    lead = find(t[i])
    if lead.parts is not None:
        return False  # a sum inside a product cannot be cut along the product
    stride = term_size(t) // lead.size
    if offset % stride:
        return False
    k = offset // stride
    _refine(lead, "sum", [k, lead.size - k])
    return True


def _align(ra: Atom, rb: Atom, why: str) -> bool:
    """Refine both sides until they expand to the same leaves, unifying leaf by leaf."""
    for _ in range(100000):  # each round refines something; the bound is a safety net
        stamp = _REFINES[0]
        ta, tb = expand(ra), expand(rb)
        i = j = 0
        restart = False
        while i < len(ta) and j < len(tb):
            sa, sb = term_size(ta[i]), term_size(tb[j])
            if sa == sb:
                res = _align_prod(ta[i], tb[j], why, stamp)
                if res is None:
                    return _fail(ta, tb, why)
                if res:
                    restart = True
                    break
                i, j = i + 1, j + 1
            elif not _split_term(ta[i] if sa > sb else tb[j], min(sa, sb)):
                return _fail(ta, tb, why)
            else:
                restart = True
                break
        if not restart:
            return True
    raise RuntimeError("channel-atom alignment did not converge")  # cannot happen: sizes strictly shrink


def _align_prod(pa: Term, pb: Term, why: str, stamp: int) -> bool | None:
    """Unify two products of equal size. True if something was refined (the caller re-expands),
    False if done, None if impossible."""
    xs = [f for f in pa if f.size > 1]
    ys = [f for f in pb if f.size > 1]
    i = j = 0
    while i < len(xs) and j < len(ys):
        if _REFINES[0] != stamp:
            return True
        x, y = find(xs[i]), find(ys[j])
        if x.size == y.size:
            if x is not y and not unify(x, y, why):
                return None
            i, j = i + 1, j + 1
            continue
        big, small = (x, y) if x.size > y.size else (y, x)
        if big.size % small.size or big.parts is not None:
            return None  # no common refinement (or a sum would have to be cut along a product)
        _refine(big, "prod", [small.size, big.size // small.size])
        return True
    return _REFINES[0] != stamp
