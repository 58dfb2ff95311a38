"""Find each member's classification head and the computation members share.

A member is split into ``trunk -> neck -> head``:

- the **head** is the classification layer (a ``nn.Linear``) found by torchvision/timm
  conventions, else as the last ``Linear`` in execution order (via ``torch.fx``);
- the **trunk** is the longest prefix of the computation that members of one group share with
  identical parameters (compared by tensor values, not names), cut where exactly one tensor
  flows onward; members that share nothing form groups of one, whose trunk is their whole body;
- the **neck** is what is left between the trunk and the head's input.

Models ``torch.fx`` cannot trace still work: their body is run whole (the head's input is
captured with a forward hook) and they share a trunk only when all of their body's tensors are
equal to another member's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from netmeld.errors import MemberError
from netmeld.members.member import Member

HEAD_ATTRIBUTES = ("fc", "classifier", "head", "heads", "last_linear", "_fc")
# Ops allowed between the head and the model's output: they do not change logits.
_PASS_THROUGH_FUNCTIONS = {"flatten", "squeeze", "reshape", "view", "contiguous", "dropout"}
_PASS_THROUGH_MODULES = (nn.Identity, nn.Flatten, nn.Dropout)


def tensor_digest(tensor: torch.Tensor) -> str:
    """A content hash of a tensor (dtype, shape and values)."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def find_head(member: Member) -> str:
    """The qualified name of the member's classification head (a ``nn.Linear``)."""
    module = member.module
    names = {id(m): n for n, m in module.named_modules()}
    candidate: nn.Module | None = None
    if member.head is not None:
        try:
            candidate = module.get_submodule(member.head)
        except AttributeError as exc:
            raise MemberError(
                f"member {member.name!r}: head {member.head!r} is not a submodule"
            ) from exc
    if candidate is None and callable(getattr(module, "get_classifier", None)):
        try:
            got = module.get_classifier()  # type: ignore[operator]
        except Exception:  # timm API varies across versions; fall back to conventions
            got = None
        if isinstance(got, nn.Module):
            candidate = got
    if candidate is None:
        for attr in HEAD_ATTRIBUTES:
            sub = getattr(module, attr, None)
            if isinstance(sub, nn.Module):
                candidate = sub
                break
    if candidate is not None and not isinstance(candidate, nn.Linear):
        linears = [m for m in candidate.modules() if isinstance(m, nn.Linear)]
        candidate = linears[-1] if linears else None
    if candidate is None:
        candidate = _last_linear_in_execution_order(member)
    name = names.get(id(candidate)) if candidate is not None else None
    if candidate is None or name is None:
        raise MemberError(
            f"member {member.name!r}: no classification head (nn.Linear) found; "
            "pass head='qualified.name' to Member"
        )
    assert isinstance(candidate, nn.Linear)
    if candidate.out_features != len(member.labels):
        raise MemberError(
            f"member {member.name!r}: head {name!r} has {candidate.out_features} outputs, "
            f"but the member has {len(member.labels)} labels {list(member.labels)[:6]}"
        )
    return name


def _last_linear_in_execution_order(member: Member) -> nn.Module | None:
    try:
        gm = fx.symbolic_trace(member.module)
    except Exception:
        linears = [m for m in member.module.modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None
    last = None
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
            last = node.target
    return None if last is None else member.module.get_submodule(last)


@dataclass
class TracedMember:
    """A member's body (everything before its head) as a list of fx nodes, or a black box."""

    member: Member
    head_name: str
    graph_module: fx.GraphModule | None
    body: list[fx.Node]  # topological order, placeholder first, head input last
    signatures: list[Any]
    failure: str | None = None

    @property
    def traced(self) -> bool:
        return self.graph_module is not None


class _Tracer(fx.Tracer):
    def __init__(self, head_name: str) -> None:
        super().__init__()
        self.head_name = head_name

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # a module marked netmeld_leaf (a transformers backbone) is one operation
        return (
            module_qualified_name == self.head_name
            or getattr(m, "netmeld_leaf", False) is True
            or super().is_leaf_module(m, module_qualified_name)
        )


def trace_member(member: Member) -> TracedMember:
    head_name = find_head(member)
    try:
        tracer = _Tracer(head_name)
        graph = tracer.trace(member.module)
        gm = fx.GraphModule(member.module, graph)
    except Exception as exc:  # fx cannot trace data-dependent control flow: run it whole
        return TracedMember(member, head_name, None, [], [], failure=f"{type(exc).__name__}: {exc}")
    head_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == head_name]
    if len(head_nodes) != 1:
        return TracedMember(
            member,
            head_name,
            None,
            [],
            [],
            failure=f"head {head_name!r} is called {len(head_nodes)} times",
        )
    head = head_nodes[0]
    _check_output_is_head(member, gm, head)
    head_input = head.args[0]
    if not isinstance(head_input, fx.Node):
        return TracedMember(member, head_name, None, [], [], failure="head input is not a tensor")
    ancestors = _ancestors(head_input)
    body = [n for n in gm.graph.nodes if n in ancestors]
    placeholders = [n for n in body if n.op == "placeholder"]
    if len(placeholders) != 1 or body[0].op != "placeholder":
        return TracedMember(
            member, head_name, None, [], [], failure="the body does not read exactly one input"
        )
    return TracedMember(member, head_name, gm, body, _signatures(member, gm, body))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _check_output_is_head(member: Member, gm: fx.GraphModule, head: fx.Node) -> None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    while isinstance(node, fx.Node) and node is not head:
        passes = False
        if node.op == "call_module":
            passes = isinstance(gm.get_submodule(str(node.target)), _PASS_THROUGH_MODULES)
        elif node.op in ("call_function", "call_method"):
            target = node.target if isinstance(node.target, str) else node.target.__name__
            passes = target in _PASS_THROUGH_FUNCTIONS
        if not passes or not node.args:
            raise MemberError(
                f"member {member.name!r}: the output of head {head.target!r} goes through "
                f"{node.format_node()} before the model's output; netmeld expects members "
                "to output the head's logits"
            )
        node = node.args[0]
    if node is not head:
        raise MemberError(
            f"member {member.name!r}: the model's output is not the output of head {head.target!r}"
        )


def _describe(value: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(value, fx.Node):
        return ("node", index[value])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v, index) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _describe(v, index)) for k, v in value.items())))
    if isinstance(value, torch.Tensor):
        return ("tensor", tensor_digest(value))
    if isinstance(value, (int, float, str, bool, type(None), slice, torch.dtype, torch.device)):
        return repr(value)
    return (type(value).__qualname__, repr(value))


def _module_signature(module: nn.Module) -> tuple[Any, ...]:
    tensors = [(k, tensor_digest(v)) for k, v in module.state_dict().items()]
    return (type(module).__module__, type(module).__qualname__, module.extra_repr(), tuple(tensors))


def _signatures(member: Member, gm: fx.GraphModule, body: list[fx.Node]) -> list[Any]:
    index = {n: i for i, n in enumerate(body)}
    sigs: list[Any] = []
    for n in body:
        args = _describe(n.args, index), _describe(n.kwargs, index)
        if n.op == "placeholder":
            sigs.append(("placeholder", repr(member.preprocessing)))
        elif n.op == "call_module":
            sigs.append(("call_module", _module_signature(gm.get_submodule(str(n.target))), args))
        elif n.op == "get_attr":
            attr = _fetch_attr(gm, str(n.target))
            value = tensor_digest(attr) if isinstance(attr, torch.Tensor) else repr(attr)
            sigs.append(("get_attr", value))
        elif n.op == "call_function":
            target = (
                getattr(n.target, "__module__", ""),
                getattr(n.target, "__qualname__", repr(n.target)),
            )
            sigs.append(("call_function", target, args))
        else:
            sigs.append((n.op, n.target, args))
    return sigs


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _live_after(body: list[fx.Node], cut: int) -> list[int]:
    """Indices of prefix nodes (``< cut``) still read by nodes at or after ``cut``."""
    prefix = set(body[:cut])
    index = {n: i for i, n in enumerate(body)}
    live: set[int] = set()
    for n in body[cut:]:
        for arg in n.all_input_nodes:
            if arg in prefix:
                live.add(index[arg])
    if cut == len(body):
        live.add(cut - 1)  # the head input itself flows on
    return sorted(live)


def _common_prefix(a: TracedMember, b: TracedMember) -> int:
    n = 0
    for sa, sb in zip(a.signatures, b.signatures, strict=False):
        if sa != sb:
            break
        n += 1
    return n


def _body_digest(t: TracedMember) -> tuple[Any, ...]:
    state = t.member.module.state_dict()
    head_prefix = t.head_name + "."
    return (
        type(t.member.module).__qualname__,
        repr(t.member.preprocessing),
        tuple((k, tensor_digest(v)) for k, v in state.items() if not k.startswith(head_prefix)),
    )


@dataclass(frozen=True)
class Group:
    """Members that share a trunk; ``cut`` is the number of body nodes in the trunk.

    ``cut`` is ``None`` for black-box (untraceable) members, whose whole body is the trunk.
    """

    members: tuple[str, ...]
    cut: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"members": list(self.members), "cut": self.cut}


def plan_groups(traced: Sequence[TracedMember]) -> list[Group]:
    """Group members by the longest trunk they share, in the members' order.

    A member joins the first group whose first member it shares at least one parametrised
    operation with; the group's trunk is the prefix all its members share, cut where exactly
    one tensor flows onward.
    """
    groups: list[list[TracedMember]] = []
    for t in traced:
        for g in groups:
            if _shares_with(g[0], t):
                g.append(t)
                break
        else:
            groups.append([t])
    plan: list[Group] = []
    for g in groups:
        names = tuple(t.member.name for t in g)
        if not g[0].traced:
            plan.append(Group(names, None))
            continue
        if len(g) == 1:
            plan.append(Group(names, len(g[0].body)))
            continue
        common = min(_common_prefix(g[0], t) for t in g[1:])
        cut = _best_cut(g, common)
        plan.append(Group(names, cut))
    return plan


def _shares_with(a: TracedMember, b: TracedMember) -> bool:
    if not a.traced or not b.traced:
        return (not a.traced and not b.traced) and _body_digest(a) == _body_digest(b)
    common = _common_prefix(a, b)
    if common < 2:
        return False
    if not any(op == "call_module" for op, *_ in a.signatures[1:common]):
        return False
    return _best_cut([a, b], common) >= 2


def _best_cut(group: Sequence[TracedMember], common: int) -> int:
    for cut in range(common, 1, -1):
        lives = [_live_after(t.body, cut) for t in group]
        if all(len(live) == 1 for live in lives) and all(live == lives[0] for live in lives):
            return cut
    return 1


def share_summary(traced: Sequence[TracedMember], plan: Sequence[Group]) -> list[dict[str, Any]]:
    """What each group shares and where each member diverges, for ``netmeld inspect``."""
    by_name = {t.member.name: t for t in traced}
    rows = []
    for group in plan:
        first = by_name[group.members[0]]
        trunk_params = _params_in(first, group.cut)
        for name in group.members:
            t = by_name[name]
            total = sum(p.numel() for p in t.member.module.parameters())
            head = t.member.module.get_submodule(t.head_name)
            head_params = sum(p.numel() for p in head.parameters())
            if group.cut is None or not t.traced:
                diverge = "(not traceable: body run whole)" if not t.traced else ""
            elif group.cut >= len(t.body):
                diverge = f"at head {t.head_name!r}"
            else:
                diverge = _node_name(t.body[group.cut])
            rows.append(
                {
                    "member": name,
                    "group": group.members[0],
                    "shared_with": [m for m in group.members if m != name],
                    "trunk_parameters": trunk_params,
                    "own_parameters": total - trunk_params if len(group.members) > 1 else total,
                    "head": t.head_name,
                    "head_parameters": head_params,
                    "diverges_at": diverge,
                    "traced": t.traced,
                    "total_parameters": total,
                }
            )
    return rows


def _node_name(n: fx.Node) -> str:
    return f"{n.target}" if n.op in ("call_module", "get_attr") else f"{n.name} ({n.op})"


def _params_in(t: TracedMember, cut: int | None) -> int:
    if not t.traced or cut is None:
        head = t.member.module.get_submodule(t.head_name)
        return sum(p.numel() for p in t.member.module.parameters()) - sum(
            p.numel() for p in head.parameters()
        )
    assert t.graph_module is not None
    seen: set[int] = set()
    total = 0
    for n in t.body[:cut]:
        if n.op == "call_module":
            tensors: list[torch.Tensor] = list(
                t.graph_module.get_submodule(str(n.target)).parameters()
            )
        elif n.op == "get_attr":
            attr = _fetch_attr(t.graph_module, str(n.target))
            tensors = [attr] if isinstance(attr, nn.Parameter) else []
        else:
            tensors = []
        for p in tensors:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def build_submodule(t: TracedMember, start: int, stop: int) -> nn.Module:
    """A module computing body nodes ``[start, stop)`` of a traced member.

    With ``start == 0`` it reads the member's input; otherwise it reads the single tensor that
    flows across the cut at ``start``. It returns the single tensor flowing past ``stop`` (the
    head input when ``stop`` is the body's length).
    """
    assert t.graph_module is not None
    body = t.body
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start == 0:
        nodes = body[:stop]
    else:
        (live,) = _live_after(body, start)
        env[body[live]] = graph.placeholder("x")
        nodes = body[start:stop]
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    out_index = _live_after(body, stop) if stop < len(body) else [len(body) - 1]
    if len(out_index) != 1:
        raise MemberError(f"member {t.member.name!r}: cannot cut its body at node {stop}")
    graph.output(env[body[out_index[0]]])
    if start > 0 and stop == start:
        return nn.Identity()
    gm = fx.GraphModule(t.graph_module, graph)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


class CapturedBody(nn.Module):
    """Runs an untraceable member whole and returns its head's input.

    A forward pre-hook on the head records that input only while this module's ``forward``
    runs: it is registered at the start of the call and removed at its end, so the user's
    module carries no hook of netmeld's outside it (however many models are built on it).
    """

    def __init__(self, module: nn.Module, head_name: str) -> None:
        super().__init__()
        self.model = module
        self.head_name = head_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])

        handle = self.model.get_submodule(self.head_name).register_forward_pre_hook(capture)
        try:
            self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise MemberError(f"head {self.head_name!r} did not run in the member's forward")
        return captured[-1]
