"""Loop-corrected cost of a compiled program, read from its own optimized HLO.

Why: XLA's `cost_analysis()` counts each while-loop body once (checked on TPU and
CPU), and a scanned model has three loops per step: the forward layer scan, its
transpose in the backward pass, and the microbatch loop around both. The old
correction compiled 1- and 2-layer unrolled copies of the step at full width
(train/planning/compiled.py `calibration_configs`), most of the compile time for 175B.

Here no second compile is needed. The optimized HLO already says how often each
loop runs (`known_trip_count` in the while's backend_config: scans have static
lengths), so each loop body is cut out of the module text as a module of its own,
costed by XLA's own cost model (`cost_fn`, the same HloCostAnalysis that costed
the whole program), and counted trip-count times:
    true(C) = cost(C) + sum over loops w in C:  trip(w) * true(body_w) - cost(body_w)
recursively (the microbatch body holds the layer loops). The loop condition's
few scalar ops are left counted once. Pure text work plus `cost_fn`: no jax here.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

# `%name (params) -> shape {` or `ENTRY %name ...{` at column 0; `%` is optional in newer printers.
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(%?([\w.\-]+)\).*?condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)(.*)$")
# `%name = TYPE opcode(operands), attributes`: TYPE may be a tuple with spaces, so the opcode
# is the first lowercase word after a space that opens a parenthesis.
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s.*?\s([a-z][\w\-]*)\((.*?)\)(.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLED = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)|"
                     r"(?:branch_computations|called_computations)=\{([^}]*)\}")

CostFn = Callable[[str], dict]


class HloModuleText:
    """A module's text split into its preamble (stack frames etc.) and named computations."""

    def __init__(self, text: str):
        lines = text.splitlines()
        self.preamble: list[str] = []
        self.computations: dict[str, list[str]] = {}
        entry: Optional[str] = None
        current = None
        for line in lines:
            if current is None:
                m = _HEADER.match(line)
                if m:
                    current = m[2]
                    self.computations[current] = [line[len(m[1]):] if m[1] else line]
                    if m[1]:
                        entry = current
                elif not self.computations and not line.startswith("HloModule"):
                    self.preamble.append(line)
                continue
            self.computations[current].append(line)
            if line.rstrip() == "}":  # not `}}, metadata=`: a custom call's config may span lines
                current = None
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        self.entry: str = entry

    def loops(self, name: str) -> list[tuple[str, Optional[int]]]:
        """(body, trip count or None) of each while loop run by `name`, including through
        fusions and calls (not through other loops' bodies, which count on their own)."""
        found, seen, todo = [], set(), [name]
        while todo:
            comp = todo.pop()
            if comp in seen or comp not in self.computations:
                continue
            seen.add(comp)
            for line in self.computations[comp][1:]:
                if m := _WHILE.search(line):
                    found.append((m[3], self.trip_count(comp, m)))
                    continue
                for called in _CALLED.finditer(line):
                    names = [called[1]] if called[1] else re.findall(r"%?([\w.\-]+)", called[2])
                    todo.extend(names)
        return found

    def trip_count(self, comp: str, loop: re.Match) -> Optional[int]:
        """The loop's static trip count: XLA's `known_trip_count` where the backend keeps it (CPU),
        else from the loop's own induction variable (TPU's final HLO drops the annotation): its
        start (a constant in the operand tuple), its bound (`i < N` or `i <= N` in the condition)
        and its step (`i + c` in the body's root tuple). XLA's windowed einsums step by 2 (seen on
        TPU: `i < 4`, `i += 2`, two trips), so the step is read, not assumed."""
        if trip := _TRIP.search(loop[4]):
            return int(trip[1])
        cond = self._defs(loop[2])
        root = next((op for name in cond if (op := self._op(cond, name))[0] == "compare"
                     and re.search(r"direction=L[TE]", op[2])), None)
        if root is None:
            return None
        lhs, rhs = root[1][:2]
        index = re.search(r"index=(\d+)", cond.get(lhs, ("", "", ""))[2])
        end = self._constant(cond, rhs)
        operand = self._defs(comp).get(loop[1])
        if index is None or end is None or operand is None or operand[0] != "tuple":
            return None
        start = self._constant(self._defs(comp), re.findall(r"%?([\w.\-]+)", operand[1])[int(index[1])])
        step = self._step(loop[3], int(index[1]))
        if start is None or step is None or step <= 0:
            return None
        last = end + 1 if "direction=LE" in root[2] else end  # i <= N runs as i < N + 1
        return max(0, -(-(last - start) // step))  # ceil((last - start) / step)

    def _op(self, defs: dict, name: str) -> tuple[str, list[str], str]:
        """(opcode, operand names, attributes) of instruction `name`, looking through a fusion of
        one op (CPU wraps a loop's compare and increment so: `fusion(i, c), calls=%wrapped_add`)."""
        op, operands, attrs = defs.get(name, ("", "", ""))
        names = re.findall(r"%?([\w.\-]+)", operands)
        called = re.search(r"calls=%?([\w.\-]+)", attrs)
        if op != "fusion" or not called:
            return op, names, attrs
        lines = self.computations.get(called[1], [])
        root = next((m for line in lines[1:] if line.lstrip().startswith("ROOT") and (m := _DEF.match(line))), None)
        if root is None:
            return op, names, attrs
        params = {m[1]: int(p[1]) for line in lines[1:] if (m := _DEF.match(line)) and m[2] == "parameter"
                  and (p := re.fullmatch(r"\s*(\d+)\s*", m[3]))}
        inner = re.findall(r"%?([\w.\-]+)", root[3])
        if not all(n in params and params[n] < len(names) for n in inner):
            return op, names, attrs
        return root[2], [names[params[n]] for n in inner], root[4]

    def _step(self, body: str, index: int) -> Optional[int]:
        """c in the body's `i' = i + c` for tuple element `index` (1 when the body's root is not a
        tuple this can read: the old assumption, kept for hand-cut modules)."""
        lines = self.computations.get(body, [])
        root = next((m for line in lines[1:] if line.lstrip().startswith("ROOT") and (m := _DEF.match(line))), None)
        if root is None or root[2] != "tuple":
            return 1
        defs = self._defs(body)
        name = re.findall(r"%?([\w.\-]+)", root[3])[index]
        for _ in range(8):  # through copies of the incremented value
            op, operands, _attrs = defs.get(name, ("", "", ""))
            if op not in ("copy", "bitcast", "convert"):
                break
            name = operands.strip().lstrip("%")
        op, names, _attrs = self._op(defs, name)
        if op != "add":
            return 1 if op in ("get-tuple-element", "parameter") else None
        found = [c for n in names[:2] if (c := self._constant(defs, n)) is not None]
        return found[0] if len(found) == 1 else None

    def _defs(self, comp: str) -> dict[str, tuple[str, str, str]]:
        """{instruction: (opcode, operands, attributes)} of one computation."""
        return {m[1]: (m[2], m[3], m[4]) for line in self.computations.get(comp, [])[1:] if (m := _DEF.match(line))}

    @staticmethod
    def _constant(defs: dict, name: str, hops: int = 8) -> Optional[int]:
        """An integer constant, through copies (TPU copies the start value into the tuple)."""
        while hops and name in defs:
            op, operands, _ = defs[name]
            if op == "constant" and re.fullmatch(r"-?\d+", operands.strip()):
                return int(operands)
            if op not in ("copy", "bitcast", "convert"):
                return None
            name, hops = operands.strip().lstrip("%"), hops - 1
        return None

    def reachable(self, name: str) -> list[str]:
        """`name` and every computation it references, in module order (callees first)."""
        keep, todo = set(), [name]
        while todo:
            comp = todo.pop()
            if comp in keep or comp not in self.computations:
                continue
            keep.add(comp)
            body = "\n".join(self.computations[comp][1:])
            todo.extend(n for n in re.findall(r"%([\w.\-]+)", body) if n in self.computations)
            todo.extend(n for n in re.findall(r"(?:=|\{|, )([\w.\-]+)", body) if n in self.computations)
        return [c for c in self.computations if c in keep]

    def module_with_entry(self, name: str) -> str:
        """A parseable module whose ENTRY is computation `name` (a loop body as its own program)."""
        safe = re.sub(r"[^\w]", "_", name)
        parts = [f"HloModule cut_{safe}", *self.preamble]
        for comp in self.reachable(name):
            lines = self.computations[comp]
            head = ("ENTRY " + lines[0]) if comp == name else lines[0]
            parts += [head, *lines[1:], ""]
        return "\n".join(parts)


def loop_corrected_cost(text: str, cost_fn: CostFn, keys=("flops",)) -> Optional[dict]:
    """{key: whole-step cost} with every loop body counted as often as it runs; None when a
    loop's trip count is not static (then only a calibration compile can tell).

    cost_fn(module text) -> XLA's cost dict for that module, loops counted once."""
    module = HloModuleText(text)
    cache: dict[str, dict] = {}

    def cost(name: str) -> dict:
        if name not in cache:
            full = cost_fn(module.module_with_entry(name)) if name != module.entry else cost_fn(text)
            cache[name] = {k: float(full.get(k, 0.0)) for k in keys}
        return cache[name]

    def true(name: str, depth: int = 0) -> Optional[dict]:
        if depth > 16:
            raise ValueError("loops nested deeper than 16: not a train step")
        total = dict(cost(name))
        for body, trip in module.loops(name):
            if trip is None:
                return None
            inner = true(body, depth + 1)
            if inner is None:
                return None
            once = cost(body)
            for k in keys:
                total[k] += trip * inner[k] - once[k]
        return total

    return true(module.entry)


def loop_trip_counts(text: str) -> list[Optional[int]]:
    """Every while loop's static trip count, in module order (None where unknown)."""
    module = HloModuleText(text)
    return [module.trip_count(comp, m) for comp, lines in module.computations.items() for line in lines[1:]
            if (m := _WHILE.search(line))]


# A cross-slice transfer in libtpu's multi-slice HLO: a host-transfer `send` handled by the
# "megascale" runtime (the DCN), tagged with its collective, e.g.
#   %send = (f32[1,1,128]{...}, u32[], token[]) send(%x, %after-all), ..., _xla_megascale_transfer_type="ALL_REDUCE"
_DCN_SEND = re.compile(r"=\s*\(([a-z]+\d*)\[([\d,]*)\].*?\)\s+send\(.*_xla_megascale_transfer_type=\"([A-Z_]+)\"")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


def dcn_send_bytes(text: str) -> dict:
    """{"dcn bytes": bytes the module sends across slices}, loops counted once (a cost_fn for
    `loop_corrected_cost`, which then counts each loop's sends trip-count times)."""
    total = 0
    for m in _DCN_SEND.finditer(text):
        size = _DTYPE_BYTES.get(m[1], 4)
        for d in m[2].split(",") if m[2] else ():
            size *= int(d)
        total += size
    return {"dcn bytes": total}
