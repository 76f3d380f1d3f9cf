"""`GroupLayout`: the groups, and the experts ordered by group, so that each group's experts are one contiguous slice.

Built once from names and shared by the router, the overrides, the trace and the dashboard, so that none of them
re-derives which columns belong to which group.

    groups         ("task", "knowledge", "style")                       G names
    experts        ("summarize", "triage", "drug_classes", "bullets")   E names, ordered by group
    expert_groups  ("task", "task", "knowledge", "style")               the group of each expert
    group_index    (0, 0, 1, 2)                                          [E] the index of each expert's group
    slices         (slice(0, 2), slice(2, 3), slice(3, 4))               [G] each group's experts
    sizes          (2, 1, 1)                                             [G] experts per group
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupLayout:
    """Groups and their experts. Raises ValueError unless every group has an expert and the experts are ordered by
    group (the router and the overrides normalise over contiguous slices)."""

    groups: tuple[str, ...]
    experts: tuple[str, ...]
    expert_groups: tuple[str, ...]   # group of each expert, aligned with `experts`
    group_index: tuple[int, ...] = field(init=False, repr=False, compare=False)
    slices: tuple[slice, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("groups", "experts", "expert_groups"):   # any sequences in, tuples kept (hashable, immutable)
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._check()
        object.__setattr__(self, "group_index", tuple(self.groups.index(g) for g in self.expert_groups))
        slices, start = [], 0
        for g in self.groups:
            stop = start + self.expert_groups.count(g)
            slices.append(slice(start, stop))
            start = stop
        object.__setattr__(self, "slices", tuple(slices))

    def _check(self) -> None:
        groups, experts, expert_groups = self.groups, self.experts, self.expert_groups
        if not experts or len(experts) != len(expert_groups):
            raise ValueError(f"a group layout needs at least one expert and one group per expert, got experts "
                             f"{list(experts)} in groups {list(expert_groups)}")
        for kind, names in (("group", groups), ("expert", experts)):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names {duplicates}")
        unknown = sorted(set(expert_groups) - set(groups))
        if unknown:
            raise ValueError(f"experts use group(s) {unknown} that are not declared in {list(groups)}")
        empty = [g for g in groups if g not in expert_groups]
        if empty:
            raise ValueError(f"group(s) {empty} have no experts")
        if list(dict.fromkeys(expert_groups)) != list(groups):
            raise ValueError(f"experts must be ordered by group {list(groups)}, got groups {list(expert_groups)}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """[G] the number of experts in each group."""
        return tuple(s.stop - s.start for s in self.slices)

    def members(self, group: str) -> list[int]:
        """Indices (into `experts`) of the experts of `group`."""
        return list(range(len(self.experts)))[self.slices[self.groups.index(group)]]

    def experts_of(self, group: str) -> list[str]:
        """Names of the experts of `group`, in order."""
        return list(self.experts[self.slices[self.groups.index(group)]])

    def group_of(self, expert: str) -> str:
        return self.expert_groups[self.experts.index(expert)]

    def parse_target(self, target: str) -> tuple[str, str]:
        """"group:<g>" or "expert:<e>" → (level, name); ValueError naming the choices otherwise."""
        level, sep, name = target.partition(":")
        names = {"group": self.groups, "expert": self.experts}.get(level)
        if not sep or names is None or name not in names:
            choices = [f"group:{g}" for g in self.groups] + [f"expert:{e}" for e in self.experts]
            raise ValueError(f"target {target!r} is not one of {choices}")
        return level, name


__all__ = ["GroupLayout"]
