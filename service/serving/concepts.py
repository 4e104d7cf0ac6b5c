"""CRAFT concepts on the serving side: ``Explain`` with ``concepts`` > 0, and ``GetConcepts``.

The archive's bank (:class:`~service.engine.concepts.ConceptBank`, read once per worker) is
checked at planning time, before any decode or forward: a count with no bank, on a model
whose layers cannot be hooked (an exported program), or above the bank's ``k`` is refused,
and the concepts' forwards join the request's bill (:mod:`service.protocol.cost`). The
work itself runs once a job's maps are done, one target after the other, under the job's
deadline and cancellation.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.concepts import ConceptBank, explain_concepts, importance_cost
from service.engine.concepts.importance import DEFAULT_DESIGNS
from service.engine.layers import resolve_layer
from service.engine.targets import check_target_range
from service.protocol.cost import Cost, Item, check_budget
from service.protocol.errors import InvalidInputError, UnsupportedMethodError
from service.protocol.limits import Limits
from service.runtime.artifacts import ModelBundle
from service.serving import codec
from service.serving.jobs import Job

NO_BANK = (
    "this model's archive holds no concept bank: add one with "
    "'saliency-serve concepts --archive MODEL.mar --images DIR'"
)


class ConceptServer:
    """Serves one bundle's concept bank (or says clearly that it has none)."""

    def __init__(
        self, bundle: ModelBundle, bank: ConceptBank | None, limits: Limits | None = None
    ) -> None:
        self.bundle = bundle
        self.bank = bank
        self.limits = limits or Limits()
        self.labels = bundle.meta.labels

    @classmethod
    def load(cls, bundle: ModelBundle, model_dir: Path | None, limits: Limits) -> ConceptServer:
        """The server of the bank stored in ``model_dir``; of none without a folder or bank."""
        return cls(bundle, ConceptBank.read(model_dir) if model_dir else None, limits)

    def _require_bank(self) -> ConceptBank:
        if self.bank is None:
            raise UnsupportedMethodError(NO_BANK)
        return self.bank

    def check(self, request: pb.ExplainRequest, targets: int, explained: Cost) -> None:
        """Planning: the count against the bank and the model, the cost against the budget.

        Args:
            request: the request (its ``concepts`` and ``target_classes``).
            targets: how many targets the request explains.
            explained: what its explanations and scores already cost.
        """
        if request.concepts == 0:
            return
        bank = self._require_bank()
        if self.bundle.gradient_source != "eager" or self.bundle.engine.model is None:
            raise UnsupportedMethodError(
                "concepts need a model whose layers can be hooked; this one was archived "
                "as an exported program"
            )
        if request.concepts > bank.k:
            raise InvalidInputError(
                f"concepts must be at most {bank.k} (the concepts per class of this "
                f"model's bank), got {request.concepts}"
            )
        for target in request.target_classes:
            self._class_bank(bank, int(target))
        cost = importance_cost(bank.k, DEFAULT_DESIGNS, self.bundle.meta.input_size)
        label = f"concepts (k={bank.k}, n_designs={DEFAULT_DESIGNS})"
        check_budget([Item("explanations", explained), Item(label, cost, targets)], self.limits)

    def _class_bank(self, bank: ConceptBank, target: int) -> np.ndarray:
        if target not in bank.classes:
            raise UnsupportedMethodError(
                f"the concept bank has no concepts for class {target} "
                f"({self.labels[target]!r}): it was built without images of it"
            )
        return bank.classes[target].bank

    def explain(self, job: Job) -> list[pb.TargetConcepts]:
        """The job's concepts, per target in work order; raises the error that fails it."""
        if job.request.concepts == 0:
            return []
        assert job.model_input is not None and job.pixels is not None and job.query is not None
        bank = self._require_bank()
        model = self.bundle.engine.model
        assert model is not None, "check() refused a model without one"
        layer = resolve_layer(model, bank.layer)
        image = torch.from_numpy(job.model_input[None]).to(self.bundle.engine.device)
        height, width = job.pixels.shape[:2]

        start = time.perf_counter()
        found = []
        for target in dict.fromkeys(work.target for work in job.work):
            attributions = explain_concepts(
                model, layer, image, target, self._class_bank(bank, target),
                top=job.request.concepts, seed=job.query.seed % 2**63,
                chunk_size=self.bundle.engine.chunk_size, check=job.check_stopped,
            )  # fmt: skip
            found.append(
                pb.TargetConcepts(
                    target=target,
                    target_label=self.labels[target],
                    concepts=[
                        pb.ConceptAttribution(
                            concept=a.concept,
                            importance=a.importance,
                            map=codec.encode_map(
                                codec.resize_map(a.map, height, width), job.query.map_encoding
                            ),
                        )
                        for a in attributions
                    ],
                )
            )
        job.add_time("concepts", time.perf_counter() - start)
        return found

    def catalog(self, request: pb.GetConceptsRequest) -> pb.GetConceptsResponse:
        """``GetConcepts``: the bank's classes (all, or those asked), with typical crops."""
        bank = self._require_bank()
        check_target_range(request.classes, len(self.labels))
        wanted = list(dict.fromkeys(request.classes)) or sorted(bank.classes)
        classes = []
        for target in wanted:
            self._class_bank(bank, int(target))
            concepts = bank.classes[int(target)]
            classes.append(
                pb.ClassConcepts(
                    target=target,
                    target_label=self.labels[target],
                    concepts=[
                        pb.ConceptInfo(concept=i, crops=list(crops))
                        for i, crops in enumerate(concepts.crops)
                    ],
                )
            )
        return pb.GetConceptsResponse(
            model=pb.ModelRef(name=self.bundle.meta.name, version=self.bundle.meta.version),
            layer=bank.layer, k=bank.k, crop_size=bank.crop_size, seed=bank.seed,
            source=bank.source, classes=classes,
        )  # fmt: skip
