"""Dimension rules: for every canonical IR op, how its input axes relate to its output axes.

A rule unifies axes that carry the same channels, refines axes into heads / parts, and blocks
axes whose channels cannot be removed exactly (a reduction over them, a norm's statistics, a
size fixed by code). Any axis of a node that its rule does not mention is blocked afterwards,
with the op named in the reason: an unknown or half-understood op never lets pruning through.

Some values hold *indices into an axis* rather than data along it (top-k expert ids, sort
permutations). `DimState.indexes` tracks which atom such a value addresses, so that `histc`,
`one_hot` and gathers that consume it join that atom: this is how MoE experts meet their router
rows without depending on which experts the example input happened to route to.
"""

from __future__ import annotations

from typing import Callable

from slimc.compiler.analysis.channel_atoms import Atom, block, leaves, make, mark_inexact, tag, unify
from slimc.compiler.ir.graph import Graph, Node, Value

CAST_FNS = {"to", "_to_copy", "clone", "contiguous", "detach", "alias", "float", "type_as", "copy", "lift_fresh_copy",
            "lift_fresh"}


class DimState:
    """Atoms for every axis of every value, plus index-space links and the touched-axis log."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.atoms: dict[int, list[Atom]] = {}
        self.indexes: dict[int, Atom] = {}
        self.touched: set[tuple[int, int]] = set()
        self.even_splits: list[tuple[str, list[Atom]]] = []  # chunk parts, checked once all rules ran
        self.producers: set[tuple[str, int]] = set()  # (param, axis) that are a layer's output channels

    def axes(self, v: Value | None) -> list[Atom]:
        if v is None or v.shape is None:
            return []
        got = self.atoms.get(id(v))
        if got is None:
            got = [Atom(d if isinstance(d, int) else 1, () if isinstance(d, int) else ("symbolic size",)) for d in v.shape]
            self.atoms[id(v)] = got
        return got

    def ax(self, v: Value | None, i: int) -> Atom | None:
        a = self.axes(v)
        if not a:
            return None
        i = i % len(a)
        self.touched.add((id(v), i))
        return a[i]

    def rank(self, v: Value | None) -> int:
        return len(self.axes(v))

    def size(self, v: Value, i: int) -> int:
        return self.ax(v, i).size

    def link(self, v1: Value | None, i1: int, v2: Value | None, i2: int, why: str) -> None:
        if v1 is None or v2 is None:
            return
        a, b = self.ax(v1, i1), self.ax(v2, i2)
        if a is None or b is None:
            return
        if a.size == 1 or b.size == 1:
            return  # broadcast: a size-1 axis carries no channels
        unify(a, b, why)

    def fresh(self, size: int, reason: str | None = None) -> Atom:
        return Atom(size, (reason,) if reason else ())

    def block_untouched(self, node: Node) -> None:
        for v in [*node.inputs, *node.outputs]:
            for i, a in enumerate(self.axes(v)):
                if (id(v), i) not in self.touched:
                    block(a, f"{_where(node)}: axis {i} of {v.name} has no rule")


def _where(node: Node) -> str:
    src = node.source_op or node.op
    return f"{src} ({node.module or node.name})"


def _ins(node: Node) -> list[Value]:
    return [v for v in node.inputs if v is not None]


# --- rules --------------------------------------------------------------------------------------

def rule_broadcast(st: DimState, node: Node) -> None:
    out = node.outputs[0]
    r = st.rank(out)
    for v in _ins(node):
        rv = st.rank(v)
        for k in range(1, rv + 1):
            if k > r:
                break
            st.ax(v, -k)
            if st.size(v, -k) == st.size(out, -k):
                st.link(v, -k, out, -k, _where(node))
    for k in range(r):
        st.ax(out, k)
    if node.op == "div" and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].param:
        d = node.inputs[1]
        for k in range(st.rank(d)):
            if st.size(d, k) > 1:
                mark_inexact(st.ax(d, k), f"{_where(node)}: divides by {d.param}; a zeroed entry gives inf")
    if node.op == "unary" and node.attrs.get("fn") in CAST_FNS:
        src = node.inputs[0]
        if id(src) in st.indexes:
            st.indexes[id(out)] = st.indexes[id(src)]


def rule_linear(st: DimState, node: Node) -> None:
    x, w, b = (node.inputs + [None, None, None])[:3]
    out = node.outputs[0]
    wo, wi = node.attrs.get("w_out_axis", 0), node.attrs.get("w_in_axis", 1)
    why = _where(node)
    st.link(x, -1, w, wi, why)
    st.link(out, -1, w, wo, why)
    if b is not None:
        st.link(b, -1, out, -1, why)
        for k in range(st.rank(b) - 1):
            st.ax(b, k)
    for k in range(st.rank(x) - 1):
        st.link(x, k, out, k, why)
    if w is not None and w.param:
        st.producers.add((w.param, wo % max(1, st.rank(w))))
    tag(st.ax(w, wo), "linear.out")
    tag(st.ax(w, wi), "linear.in")


def rule_matmul(st: DimState, node: Node) -> None:
    a, b = node.inputs[:2]
    out = node.outputs[0]
    why = _where(node)
    ra, rb = st.rank(a), st.rank(b)
    st.link(a, -1, b, -2 if rb >= 2 else -1, why)
    ro = st.rank(out)
    if ra >= 2:
        st.link(a, -2, out, -2 if rb >= 2 else -1, why)
    if rb >= 2:
        st.link(b, -1, out, -1, why)
    # batch axes broadcast right-aligned
    nb = ro - (ra >= 2) - (rb >= 2)
    for v, rv in ((a, ra), (b, rb)):
        vb = rv - 2 if rv >= 2 else 0
        for k in range(1, vb + 1):
            if k <= nb:
                st.ax(v, vb - k)
                if st.size(v, vb - k) == st.size(out, nb - k):
                    st.link(v, vb - k, out, nb - k, why)
    for k in range(ro):
        st.ax(out, k)
    if ra >= 4 and rb >= 4 and a.param is None and b.param is None:
        # eager attention (q @ k^T, p @ v): axis -3 holds the heads
        tag(st.ax(a, -3), "attn.q_heads", st.size(a, -3))
        tag(st.ax(b, -3), "attn.kv_heads", _real_heads(st.ax(b, -3)))
        # q.k contracts head_dim, p.v carries it out (the other axes met here are sequences):
        # the code reshapes by head_dim, so it stays whole, as under sdpa
        for v in (a, b):
            tag(st.ax(v, -1), "attn.head_dim")
            block(st.ax(v, -1), f"{why}: head_dim is kept whole (the code reshapes by it)")


def _real_heads(a: Atom | None) -> int:
    """Heads of a K/V axis not counting copies made by an expand (repeat_kv)."""
    n = 1
    for leaf in leaves(a) if a is not None and a.size > 1 else []:
        if "expand" not in leaf.tags:
            n *= leaf.size
    return n


def rule_conv(st: DimState, node: Node) -> None:
    x, w, b = (node.inputs + [None, None, None])[:3]
    out = node.outputs[0]
    g = int(node.attrs.get("groups", 1))
    tr = bool(node.attrs.get("transposed", False))
    why = _where(node)
    w_in, w_out = (0, 1) if tr else (1, 0)
    st.link(x, 0, out, 0, why)
    spatial = "conv kernel / spatial axis"
    for k in range(2, st.rank(x)):
        block(st.ax(x, k), spatial)
    for k in range(2, st.rank(out)):
        block(st.ax(out, k), spatial)
    for k in range(2, st.rank(w)):
        block(st.ax(w, k), spatial)
    if g == 1:
        st.link(x, 1, w, w_in, why)
        st.link(out, 1, w, w_out, why)
    else:
        cin, cout = st.size(x, 1), st.size(out, 1)
        within = "grouped conv: only whole groups can be removed"
        ga = st.fresh(g)
        a_in = st.fresh(cin // g, within) if cin // g > 1 else None
        a_out = st.fresh(cout // g, within) if cout // g > 1 else None
        unify(st.ax(x, 1), make("prod", [ga, a_in]), why)
        unify(st.ax(out, 1), make("prod", [ga, a_out]), why)
        if tr:
            unify(st.ax(w, 0), make("prod", [ga, a_in]), why)
            if a_out is not None:
                unify(st.ax(w, 1), a_out, why)
        else:
            unify(st.ax(w, 0), make("prod", [ga, a_out]), why)
            if a_in is not None:
                unify(st.ax(w, 1), a_in, why)
        # the weight's per-group axis has size 1 for depthwise convs: nothing to couple
        st.ax(w, 1)
        st.ax(w, 0)
        tag(ga, "conv.groups", g)
    if b is not None:
        st.link(b, 0, out, 1, why)
    if w is not None and w.param:
        st.producers.add((w.param, w_out))
    tag(st.ax(out, 1), "conv.out")


def rule_softmax(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    for k in range(st.rank(x)):
        st.link(x, k, out, k, _where(node))
    mark_inexact(st.ax(x, node.attrs["axis"]), f"softmax over this axis ({node.module})")


def rule_reduce(st: DimState, node: Node) -> None:
    x = node.inputs[0]
    axes = set(node.attrs.get("axes", []))
    keep = node.attrs.get("keepdim", False)
    fn = node.attrs.get("fn", "reduce")
    for out in node.outputs:
        j = 0
        for k in range(st.rank(x)):
            if k in axes:
                block(st.ax(x, k), f"{fn} over this axis ({node.module}): fewer channels change the result")
                if keep and j < st.rank(out):
                    st.ax(out, j)
                    j += 1
                continue
            if j < st.rank(out):
                st.link(x, k, out, j, _where(node))
            j += 1
    if len(axes) == 1:
        (a,) = axes
        idx_out = node.outputs[0] if fn in ("argmax", "argmin") else (node.outputs[1] if len(node.outputs) > 1 else None)
        if idx_out is not None and fn in ("argmax", "argmin", "max", "min"):
            st.indexes[id(idx_out)] = st.ax(x, a)


def _reshape_groups(ins: list[int], outs: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split two size lists (no 1s) into consecutive runs with equal products."""
    groups = []
    i = j = 0
    while i < len(ins) or j < len(outs):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi <= pj and i < len(ins) and (pi < pj or not gi):
                pi *= ins[i]
                gi.append(i)
                i += 1
            elif j < len(outs) and (pj < pi or not gj):
                pj *= outs[j]
                gj.append(j)
                j += 1
            else:
                break
            if pi == pj and gi and gj:
                break
        if pi != pj or not gi or not gj:
            return None
        groups.append((gi, gj))
    return groups


def rule_reshape(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    why = _where(node)
    xa = [(k, a) for k, a in enumerate(st.axes(x)) if a.size > 1]
    oa = [(k, a) for k, a in enumerate(st.axes(out)) if a.size > 1]
    for k in range(st.rank(x)):
        st.ax(x, k)
    for k in range(st.rank(out)):
        st.ax(out, k)
    groups = _reshape_groups([a.size for _, a in xa], [a.size for _, a in oa])
    if groups is None:
        msg = f"{why}: reshape mixes axes"
        for _, a in xa + oa:
            block(a, msg)
        return
    for gi, gj in groups:
        src = make("prod", [xa[i][1] for i in gi])
        dst = make("prod", [oa[j][1] for j in gj])
        unify(src, dst, why)
        if len(gj) > 1:
            # an axis split into several: the inner sizes (head_dim, ...) are constants in the code
            for j in gj[1:]:
                block(oa[j][1], f"{why}: inner factor of a reshape split (e.g. head_dim) is fixed by the code")
    if id(x) in st.indexes:  # reshaped indices still address the same axis
        st.indexes[id(out)] = st.indexes[id(x)]


def rule_permute(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    for k, p in enumerate(node.attrs["perm"]):
        st.link(x, p, out, k, _where(node))
    if id(x) in st.indexes:
        st.indexes[id(out)] = st.indexes[id(x)]


def rule_concat(st: DimState, node: Node) -> None:
    out = node.outputs[0]
    axis = node.attrs["axis"]
    why = _where(node)
    xs = _ins(node)
    if node.attrs.get("stack"):
        for x in xs:
            for k in range(st.rank(x)):
                st.link(x, k, out, k if k < axis else k + 1, why)
        block(st.ax(out, axis), f"{why}: stacked axis")
        return
    for x in xs:
        for k in range(st.rank(x)):
            if k != axis:
                st.link(x, k, out, k, why)
    unify(st.ax(out, axis), make("sum", [st.ax(x, axis) for x in xs]), why)


def rule_split(st: DimState, node: Node) -> None:
    x = node.inputs[0]
    axis = node.attrs["axis"]
    squeeze = node.attrs.get("squeeze", False)
    why = _where(node)
    parts = []
    for out in node.outputs:
        for k in range(st.rank(x)):
            if k == axis:
                continue
            st.link(x, k, out, k if (k < axis or not squeeze) else k - 1, why)
        parts.append(st.fresh(1) if squeeze else st.ax(out, axis))
    whole = st.ax(x, axis)
    unify(whole, make("sum", parts), why)
    if squeeze:
        for p in parts:
            block(p, f"{why}: unbound entry")
    elif not node.attrs.get("even"):
        for p in parts:  # the sizes must add up to the axis: no part may shrink
            block(p, f"{why}: split at sizes fixed by the code")
    else:
        st.even_splits.append((why, parts))


def rule_slice(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axis, start, end, step = (node.attrs[k] for k in ("axis", "start", "end", "step"))
    why = _where(node)
    for k in range(st.rank(x)):
        if k != axis:
            st.link(x, k, out, k, why)
    n = st.size(x, axis)
    if step != 1:
        block(st.ax(x, axis), f"{why}: strided slice")
        block(st.ax(out, axis), f"{why}: strided slice")
        return
    if start == 0 and end == n:
        st.link(x, axis, out, axis, why)
        return
    mid = st.ax(out, axis)
    parts = [st.fresh(start) if start else None, mid, st.fresh(n - end) if n - end else None]
    unify(st.ax(x, axis), make("sum", [p for p in parts if p is not None]), why)
    for p in parts[:2]:
        block(p, f"{why}: slice at offsets fixed by the code")


def rule_select(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axis, i = node.attrs["axis"], node.attrs["index"]
    why = _where(node)
    for k in range(st.rank(x)):
        if k != axis:
            st.link(x, k, out, k if k < axis else k - 1, why)
    n = st.size(x, axis)
    parts = [st.fresh(i) if i else None, st.fresh(1), st.fresh(n - i - 1) if n - i - 1 else None]
    unify(st.ax(x, axis), make("sum", [p for p in parts if p is not None]), why)
    for p in parts[:2]:
        block(p, f"{why}: select at an index fixed by the code")


def rule_expand(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    why = _where(node)
    rx, ro = st.rank(x), st.rank(out)
    for k in range(1, ro + 1):
        o = st.ax(out, -k)
        if k <= rx:
            st.ax(x, -k)
            if st.size(x, -k) == o.size:
                st.link(x, -k, out, -k, why)
                continue
        if o.size > 1:
            block(o, f"{why}: expanded copies (e.g. repeat_kv's query heads per KV head) are fixed by the code")
            tag(o, "expand")


def rule_repeat(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    why = _where(node)
    rx, ro = st.rank(x), st.rank(out)
    fixed = f"{why}: repeated copies are fixed by the code"
    if node.attrs.get("interleave"):
        axis, r = node.attrs["axis"], node.attrs["repeats"]
        for k in range(rx):
            if k != axis:
                st.link(x, k, out, k, why)
        unify(st.ax(out, axis), make("prod", [st.ax(x, axis), st.fresh(r, fixed) if r > 1 else None]), why)
        return
    reps = node.attrs["repeats"]
    for k in range(1, ro + 1):
        r = reps[-k]
        o = st.ax(out, -k)
        if k > rx:
            block(o, fixed)
            continue
        if r == 1:
            st.link(x, -k, out, -k, why)
        else:
            unify(o, make("prod", [st.fresh(r, fixed), st.ax(x, -k)]), why)


def rule_norm(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    kind = node.attrs["kind"]
    why = _where(node)
    for k in range(st.rank(x)):
        st.link(x, k, out, k, why)
    params = [v for v in node.inputs[1:] if v is not None]
    if kind == "batch":
        for p in params:
            st.link(p, 0, x, 1, why)
        tag(st.ax(x, 1), "norm.batch")
        if node.attrs.get("instance"):
            # instance norm: statistics per example and channel, over every axis after the channel
            for k in range(2, st.rank(x)):
                block(st.ax(x, k), f"instance norm statistics over this axis ({node.module}): fewer entries change them")
            if not params:
                # no weight or running stats to re-derive it from: surgery must update the count itself
                count(st.ax(x, 1), node, "num_features")
    elif kind == "group":
        g = node.attrs["num_groups"]
        c = st.size(x, 1)
        ga = st.fresh(g)
        inner = st.fresh(c // g, f"{why}: group norm: only whole groups can be removed") if c // g > 1 else None
        unify(st.ax(x, 1), make("prod", [ga, inner]), why)
        for p in params:
            st.link(p, 0, x, 1, why)
        tag(ga, "norm.group", g)
    else:
        axes = node.attrs["axes"]
        for p in params:
            for j, a in enumerate(axes[len(axes) - st.rank(p):]):
                st.link(p, j, x, a, why)
        for a in axes:
            block(st.ax(x, a), f"{kind} norm statistics over this axis ({node.module}): fewer channels change them")
            tag(st.ax(x, a), "norm.features")


def rule_prelu(st: DimState, node: Node) -> None:
    """PReLU: element-wise, with one slope per channel (axis 1; axis 0 of a 1-D input) or one shared slope."""
    x, w = node.inputs[:2]
    out = node.outputs[0]
    why = _where(node)
    for k in range(st.rank(x)):
        st.link(x, k, out, k, why)
    if w is None:
        return
    for k in range(st.rank(w)):
        st.ax(w, k)
    if st.rank(w) == 1 and st.size(w, 0) > 1:
        st.link(w, 0, x, 1 if st.rank(x) >= 2 else 0, why)
        count(st.ax(w, 0), node, "num_parameters")


def rule_rnn(st: DimState, node: Node) -> None:
    """LSTM / GRU / RNN: the input features are the feature axis (`weight_in_axis`) of the input
    weights (`input_weights`, indices into the weights: one per direction of the first layer);
    batch and time axes carry through. The hidden size is kept whole: the gates (4H or 3H rows),
    the recurrence and every later layer read it.

    Inputs: x, `n_states` initial states [layers x directions, batch, hidden], `n_lens` sequence
    lengths [batch], then the weights. The output is [batch, time, directions x hidden] (PyTorch) or
    [time, directions, batch, hidden] / [batch, time, directions, hidden] (ONNX, by layout). With
    `features_fixed` (a reason) the input features are kept whole too."""
    ns, nl = node.attrs["n_states"], node.attrs.get("n_lens", 0)
    x, states = node.inputs[0], node.inputs[1:1 + ns]
    lens, params = node.inputs[1 + ns:1 + ns + nl], node.inputs[1 + ns + nl:]
    out, finals = node.outputs[0], node.outputs[1:]
    why = _where(node)
    hidden = f"{why}: the {node.attrs.get('kind', 'rnn')} hidden size is kept whole (its gates and recurrence read it)"
    first = node.attrs["batch_first"]
    if st.rank(x) == 3:
        b_ax, t_ax = (0, 1) if first else (1, 0)
        ob, ot = (b_ax, t_ax) if st.rank(out) == 3 else ((0, 1) if first else (2, 0))
        st.link(x, t_ax, out, ot, why)
        st.link(x, b_ax, out, ob, why)
        for s in [*states, *finals]:
            st.link(s, 1, x, b_ax, why)
        for v in lens:
            st.link(v, 0, x, b_ax, why)
    else:  # unbatched: [time, features], states [layers x directions, hidden]
        st.link(x, 0, out, 0, why)
    if st.rank(out) == 4:  # ONNX: a directions axis of its own
        block(st.ax(out, 2 if first else 1), f"{why}: directions")
    weights = set(node.attrs["input_weights"])
    w_ax = node.attrs.get("weight_in_axis", 1)
    for i in sorted(weights):
        st.link(x, -1, params[i], w_ax, why)
    if node.attrs.get("features_fixed"):
        block(st.ax(x, -1), f"{why}: {node.attrs['features_fixed']}")
    block(st.ax(out, -1), hidden)
    for s in [*states, *finals]:
        block(st.ax(s, 0), f"{why}: layers x directions of the state")
        block(st.ax(s, -1), hidden)
    for i, p in enumerate(params):
        for k in range(st.rank(p)):
            if not (k == w_ax and i in weights):
                block(st.ax(p, k), hidden)
    count(st.ax(x, -1), node, "input_size")


def count(a: Atom | None, node: Node, attr: str) -> None:
    """Note that attribute `attr` of the node's module counts the channels of `a` (e.g. PReLU's
    num_parameters), so that groups carry the update for surgery (`Group.attrs`)."""
    if node.module and a is not None:
        tag(a, f"count:{node.module}:{attr}", a)


def rule_embedding(st: DimState, node: Node) -> None:
    w, ids = node.inputs[:2]
    out = node.outputs[0]
    why = _where(node)
    st.link(out, -1, w, 1, why)
    for k in range(st.rank(ids)):
        st.link(ids, k, out, k, why)
    block(st.ax(w, 0), f"{why}: embedding rows are looked up by token ids")
    tag(st.ax(w, 1), "embedding.dim")


def rule_sdpa(st: DimState, node: Node) -> None:
    q, k, v, mask = (node.inputs + [None] * 4)[:4]
    out = node.outputs[0]
    why = _where(node)
    r = st.rank(q)
    for i in range(r - 3):
        for t in (k, v, out):
            st.link(q, i, t, i, why)
    hq, hk = st.size(q, -3), st.size(k, -3)
    st.link(k, -3, v, -3, why)
    if hq == hk:
        st.link(q, -3, k, -3, why)
    elif hk > 0 and hq % hk == 0:
        gx = st.fresh(hq // hk, f"{why}: query heads per KV head (GQA) are fixed by the code")
        unify(st.ax(q, -3), make("prod", [st.ax(k, -3), gx]), why)
    else:
        block(st.ax(q, -3), f"{why}: {hq} query heads do not split over {hk} KV heads")
    st.link(q, -3, out, -3, why)
    st.link(q, -2, out, -2, why)
    st.link(k, -2, v, -2, why)
    st.link(q, -1, k, -1, why)
    block(st.ax(q, -1), f"{why}: head_dim (attention scale, RoPE pairs) is kept whole")
    st.link(v, -1, out, -1, why)
    block(st.ax(v, -1), f"{why}: head_dim is kept whole (the code reshapes by it)")
    if mask is not None:
        rm = st.rank(mask)
        targets = [(out, -3), (q, -2), (k, -2)]
        for i in range(1, rm + 1):
            st.ax(mask, -i)
            if i <= 3:
                t, ti = targets[3 - i]
                if st.size(mask, -i) == st.size(t, ti):
                    st.link(mask, -i, t, ti, why)
            elif i <= r and st.size(mask, -i) == st.size(q, -i):
                st.link(mask, -i, q, -i, why)
    # heads copied by an expand (repeat_kv) are not KV heads: count only the real ones
    tag(st.ax(q, -3), "attn.q_heads", hq)
    tag(st.ax(k, -3), "attn.kv_heads", _real_heads(st.ax(k, -3)))
    for t in (q, k, v):
        tag(st.ax(t, -1), "attn.head_dim")


def rule_gather(st: DimState, node: Node) -> None:
    x, *idx = node.inputs
    out = node.outputs[0]
    axes = node.attrs["axes"]
    why = _where(node)
    p, n = axes[0], len(axes)
    rx, ro = st.rank(x), st.rank(out)
    nb = ro - (rx - n)  # rank of the broadcast index shape
    for k in range(p):
        st.link(x, k, out, k, why)
    for k in range(p + n, rx):
        st.link(x, k, out, k - n + nb, why)
    for a, iv in zip(axes, idx):
        target = st.indexes.get(id(iv))
        if target is not None and n == 1:
            unify(st.ax(x, a), target, why)
        else:
            block(st.ax(x, a), f"{why}: indexed by data")
    for iv in idx:
        ri = st.rank(iv)
        for k in range(1, ri + 1):
            if k <= nb and st.size(iv, -k) == st.size(out, p + nb - k):
                st.link(iv, -k, out, p + nb - k, why)
            else:
                st.ax(iv, -k)
    for k in range(p, p + nb):
        st.ax(out, k)
    if id(x) in st.indexes:
        st.indexes[id(out)] = st.indexes[id(x)]


def rule_scan(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    for k in range(st.rank(x)):
        st.link(x, k, out, k, _where(node))
    mark_inexact(st.ax(x, node.attrs["axis"]), f"{node.attrs.get('fn')} accumulates along this axis ({node.module})")


def rule_topk(st: DimState, node: Node) -> None:
    x = node.inputs[0]
    axis = node.attrs["axis"]
    why = _where(node)
    for out in node.outputs:
        for k in range(st.rank(x)):
            if k != axis:
                st.link(x, k, out, k, why)
        block(st.ax(out, axis), f"{why}: selected entries")
    mark_inexact(st.ax(x, axis), f"{node.attrs.get('fn', 'topk')} selects along this axis ({node.module})")
    if len(node.outputs) > 1:
        st.indexes[id(node.outputs[1])] = st.ax(x, axis)
    if node.attrs.get("fn") == "sort" and id(x) in st.indexes:
        st.indexes[id(node.outputs[0])] = st.indexes[id(x)]


def rule_histc(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    why = _where(node)
    for k in range(st.rank(x)):
        block(st.ax(x, k), f"{why}: counted entries")
    target = st.indexes.get(id(x))
    if target is not None:
        unify(st.ax(out, 0), target, why)
    else:
        block(st.ax(out, 0), f"{why}: histogram bins fixed by the code")


def rule_one_hot(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    why = _where(node)
    for k in range(st.rank(x)):
        st.link(x, k, out, k, why)
    target = st.indexes.get(id(x))
    if target is not None:
        unify(st.ax(out, -1), target, why)
    else:
        block(st.ax(out, -1), f"{why}: one_hot classes fixed by the code")


def rule_grouped_mm(st: DimState, node: Node) -> None:
    x, w, offs = (node.inputs + [None] * 3)[:3]
    out = node.outputs[0]
    why = _where(node)
    st.link(x, 0, out, 0, why)
    st.link(x, -1, w, 1, why)
    st.link(out, -1, w, 2, why)
    if offs is not None:
        st.link(w, 0, offs, 0, why)
    tag(st.ax(w, 0), "moe.expert")
    tag(st.ax(w, 1), "moe.ffn_in")
    tag(st.ax(w, 2), "moe.ffn_out")


def rule_pool(st: DimState, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    why = _where(node)
    if st.rank(x) != st.rank(out):
        return  # every axis is blocked as untouched
    for k in range(st.rank(x)):
        if st.size(x, k) == st.size(out, k):
            st.link(x, k, out, k, why)
        else:
            block(st.ax(x, k), f"{why}: pooled / resized axis")
            block(st.ax(out, k), f"{why}: pooled / resized axis")


def rule_source(st: DimState, node: Node) -> None:
    for out in node.outputs:
        for k in range(st.rank(out)):
            block(st.ax(out, k), f"{_where(node)}: tensor created with sizes fixed at trace time")


def rule_opaque(st: DimState, node: Node) -> None:
    reason = f"op {node.source_op or node.op} ({node.module or node.name}) has no dimension rule"
    for v in [*node.inputs, *node.outputs]:
        for k in range(st.rank(v)):
            block(st.ax(v, k), reason)


RULES: dict[str, Callable[[DimState, Node], None]] = {
    "linear": rule_linear, "conv": rule_conv, "matmul": rule_matmul,
    "add": rule_broadcast, "sub": rule_broadcast, "mul": rule_broadcast, "div": rule_broadcast,
    "unary": rule_broadcast, "elementwise": rule_broadcast,
    "softmax": rule_softmax, "reduce": rule_reduce, "reshape": rule_reshape, "permute": rule_permute,
    "concat": rule_concat, "split": rule_split, "slice": rule_slice, "select": rule_select,
    "expand": rule_expand, "repeat": rule_repeat, "norm": rule_norm, "embedding": rule_embedding,
    "sdpa": rule_sdpa, "gather": rule_gather, "scan": rule_scan, "topk": rule_topk, "histc": rule_histc,
    "one_hot": rule_one_hot, "grouped_mm": rule_grouped_mm, "pool": rule_pool, "source": rule_source,
    "prelu": rule_prelu, "rnn": rule_rnn, "opaque": rule_opaque,
}


def run_rules(graph: Graph) -> DimState:
    """Apply every node's rule, then block graph inputs/outputs and whatever a rule left untouched."""
    st = DimState(graph)
    for node in graph.nodes:
        rule = RULES.get(node.op, rule_opaque)
        st.touched = set()
        try:
            rule(st, node)
        except (IndexError, KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
            # a node the rule does not understand (odd ranks, missing attrs): refuse, do not guess
            st.touched = set()
            for v in [*node.inputs, *node.outputs]:
                for k in range(st.rank(v)):
                    block(st.ax(v, k), f"{_where(node)}: rule failed ({type(exc).__name__}: {exc})")
        st.block_untouched(node)
    for v in graph.inputs:
        for k in range(st.rank(v)):
            block(st.ax(v, k), f"model input {v.name}")
    for v in graph.outputs:
        for k in range(st.rank(v)):
            block(st.ax(v, k), f"model output {v.name}")
    for name, v in graph.params.items():
        if v.dtype is not None and not v.dtype.startswith(("float", "bfloat", "complex")):
            for k in range(st.rank(v)):
                block(st.ax(v, k), f"{name} holds integers (indices), not channels")
        if not v.users:
            for k in range(st.rank(v)):
                block(st.ax(v, k), f"{name} is not used by the traced graph")
    return st
