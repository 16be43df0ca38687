"""The KServe predictor ``bodypart-router``: DICOM bytes or preprocessed tensors → body part.

``preprocess`` decodes DICOM in worker processes (the event loop never decodes), ``predict`` hands the
images to a micro-batcher that runs one ONNX Runtime call for concurrent requests, ``postprocess``
answers in the request's protocol. The bundle comes from a MODEL_URI; an alias (``@champion``) is polled
and the new version swapped in without a restart. Preprocessing is ``inference.prepare``: the same code
as ``dicom-router predict``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from kserve import Model
from kserve.errors import ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from prometheus_client import Counter, Histogram

from dicom_router.config import Settings
from dicom_router.dicom.errors import DicomInputError, InvalidPixelData, NotDicom
from dicom_router.inference import (
    Bundle,
    Prepared,
    PreprocessConfig,
    Scores,
    bundle_at,
    metadata_vector,
    prepare,
)
from dicom_router.serving.protocol import INPUT, MODEL_NAME, NOVELTY, REVIEW_THRESHOLD

log = logging.getLogger(__name__)


PREDICTIONS = Counter("dicom_router_predictions_total", "Classified images", ["label"])
REJECTED = Counter("dicom_router_rejected_total", "Inputs refused with a typed error", ["type"])
BATCH_SIZE = Histogram(
    "dicom_router_batch_size", "Images per ONNX Runtime call", buckets=(1, 2, 4, 8, 16, 32, 64)
)
RUN_SECONDS = Histogram("dicom_router_model_run_seconds", "ONNX Runtime time per batch")
RELOADS = Counter("dicom_router_model_reloads_total", "Model versions loaded after the alias moved")
DECODER_CRASHES = Counter("dicom_router_decoder_crashes_total", "Decode worker processes that died")


@dataclass
class Inputs:
    """A request after preprocessing: images (and header features) plus how to answer, bound to the
    bundle it was preprocessed for: that bundle runs it and its version is reported, even when the
    alias moves meanwhile."""

    images: npt.NDArray[np.float32]
    meta: npt.NDArray[np.float32]
    bundle: Bundle
    v2: bool
    request_id: str | None = None
    want_embedding: bool = False
    statistics: list[dict[str, float]] = field(default_factory=list)
    """Per DICOM input, its image's grey-level facts (none for tensor inputs)."""
    want_statistics: bool = False
    shadow: Shadow | None = None
    """The same request prepared for the challenger, when one is in shadow and the caller asked."""


@dataclass
class Shadow:
    images: npt.NDArray[np.float32]
    meta: npt.NDArray[np.float32]
    bundle: Bundle


@dataclass
class Outputs:
    scores: Scores
    bundle: Bundle
    inputs: Inputs
    shadow_probabilities: npt.NDArray[np.float32] | None = None


# --- payloads → DICOM bytes or tensors --------------------------------------------------------------


def v1_instances(body: dict[str, Any] | bytes) -> list[bytes | npt.NDArray[np.float32]]:
    """V1 ``{"instances": [{"b64": ...} | {"image": [[...]]}]}`` → DICOM bytes or image arrays.

    A body that is not JSON at all (``Content-Type: application/dicom``) is one DICOM instance.
    """
    document: Any = body
    if isinstance(body, bytes):
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return [body]
    if not isinstance(document, dict):
        raise NotDicom("request", 'expected {"instances": [...]}')
    instances = document.get("instances")
    if not isinstance(instances, list) or not instances:
        raise NotDicom("request", 'expected {"instances": [{"b64": "<DICOM>"}, ...]}')
    out: list[bytes | npt.NDArray[np.float32]] = []
    for i, instance in enumerate(instances):
        if isinstance(instance, dict) and "b64" in instance:
            out.append(_b64(instance["b64"], f"instances[{i}]"))
        elif isinstance(instance, dict) and "image" in instance:
            out.append(np.asarray(instance["image"], dtype=np.float32))
        else:
            raise NotDicom(f"instances[{i}]", 'each instance needs "b64" (DICOM bytes) or "image"')
    return out


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise NotDicom(where, "b64 must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise NotDicom(where, "b64 is not valid base64") from None


def v2_inputs(request: InferRequest) -> tuple[list[bytes], npt.NDArray[np.float32] | None]:
    """V2 inputs: ``dicom`` BYTES (binary extension, or base64 strings in JSON) or ``image`` FP32."""
    names = {i.name: i for i in request.inputs}
    if INPUT in names:
        tensor = names[INPUT]
        if tensor.datatype != "BYTES":
            raise NotDicom("dicom", f"input dicom must be BYTES, not {tensor.datatype}")
        return [
            item if isinstance(item, bytes) else _b64(item, f"dicom[{i}]")
            for i, item in enumerate(tensor.as_numpy().reshape(-1))
        ], None
    if "image" in names:
        tensor = names["image"]
        if tensor.datatype != "FP32":
            raise InvalidPixelData("image", f"input image must be FP32, not {tensor.datatype}")
        return [], tensor.as_numpy().astype(np.float32, copy=False)
    raise NotDicom("request", "expected an input named dicom (BYTES) or image (FP32)")


def metadata_for_tensor(n: int) -> npt.NDArray[np.float32]:
    """Header features are unknown for preprocessed tensors: all-missing rows (fusion models cope)."""
    return np.repeat(metadata_vector({})[None], n, axis=0)


def review_threshold(bundle: Bundle) -> dict[str, float]:
    """The answer's ``review_threshold`` parameter: the served model's own, absent when it has none."""
    return {} if bundle.review_threshold is None else {REVIEW_THRESHOLD: bundle.review_threshold}


def check_images(images: npt.NDArray[np.float32], config: PreprocessConfig) -> npt.NDArray[np.float32]:
    """Preprocessed images must already be what the model takes: ``[n, 1, S, S]`` in [0, 1]."""
    size = config.image_size
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != (1, size, size):
        raise InvalidPixelData("image", f"expected shape [n, 1, {size}, {size}], got {list(images.shape)}")
    if not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0:
        raise InvalidPixelData("image", "preprocessed images must be finite and in [0, 1]")
    return images


# --- decoding in worker processes -------------------------------------------------------------------


def _warm() -> None:
    """Import the decoder stack in a fresh worker so the first request does not pay for it."""


def _isolated(job: Callable[[], Prepared], path: str) -> Prepared:
    """Run ``job`` alone in a fresh process: after a pool crash, this tells the file that kills its
    decoder (it kills this process too and is refused) from the requests that merely shared the pool."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as one:
        try:
            return one.submit(job).result()
        except BrokenProcessPool:
            raise InvalidPixelData(path, "the decoder process died on this file (retried alone)") from None


class DecodePool:
    """Spawned processes that turn DICOM bytes into model inputs (``inference.prepare``).

    A worker that dies (a codec's segfault, the OOM killer) breaks a ``ProcessPoolExecutor`` for good;
    here the broken pool is replaced at once and each request it held is run again alone, so only the
    file that kills a decoder fails (with a typed error) and every later request is served.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor = self._start()
        self._replacing = asyncio.Lock()
        self._isolation = asyncio.Semaphore(workers)
        """At most ``workers`` lone re-runs at once: a crash with many requests in flight must not fork
        as many processes."""

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")  # no fork after ONNX Runtime/torch threads exist
        executor = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        for future in [executor.submit(_warm) for _ in range(self.workers)]:
            future.result()
        return executor

    @property
    def healthy(self) -> bool:
        """False while the pool is broken (until its replacement is up): readiness reports it."""
        return not getattr(self.executor, "_broken", False)

    async def prepare_all(
        self, items: Sequence[bytes], config: PreprocessConfig, max_pixels: int
    ) -> list[Prepared]:
        jobs = [
            self._prepare(partial(prepare, data, f"instances[{i}]", config, max_pixels=max_pixels))
            for i, data in enumerate(items)
        ]
        return list(await asyncio.gather(*jobs))

    async def _prepare(self, job: partial[Prepared]) -> Prepared:
        loop = asyncio.get_running_loop()
        executor = self.executor
        try:
            return await loop.run_in_executor(executor, job)
        except BrokenProcessPool:
            DECODER_CRASHES.inc()
            await self._replace(executor)
        async with self._isolation:
            return await loop.run_in_executor(None, _isolated, job, str(job.args[1]))

    async def _replace(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        async with self._replacing:
            if self.executor is not broken:  # another request already replaced it
                return
            log.warning("a decode worker died; replacing the pool of %d", self.workers)
            self.executor = await asyncio.get_running_loop().run_in_executor(None, self._start)
            broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# --- micro-batching ---------------------------------------------------------------------------------


@dataclass
class _Pending:
    images: npt.NDArray[np.float32]
    meta: npt.NDArray[np.float32]
    bundle: Bundle
    future: asyncio.Future[Scores]


@dataclass
class Batcher:
    """Collects concurrent requests for up to ``max_latency_s`` or ``max_batch`` images, one model run
    per bundle among them (a batch never mixes models, even across an alias swap)."""

    max_batch: int
    max_latency_s: float
    queue: asyncio.Queue[_Pending] = field(default_factory=asyncio.Queue)

    async def submit(
        self, images: npt.NDArray[np.float32], meta: npt.NDArray[np.float32], bundle: Bundle
    ) -> Scores:
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(images, meta, bundle, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0].images)
            deadline = loop.time() + self.max_latency_s
            while size < self.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                batch.append(item)
                size += len(item.images)
            by_bundle: dict[int, list[_Pending]] = {}
            for pending in batch:
                by_bundle.setdefault(id(pending.bundle), []).append(pending)
            for group in by_bundle.values():
                await self._run(group)

    async def _run(self, group: list[_Pending]) -> None:
        """One ONNX Runtime call for requests bound to one bundle; a failure fails only them."""
        loop = asyncio.get_running_loop()
        bundle = group[0].bundle
        try:
            started = time.perf_counter()
            scores = await loop.run_in_executor(
                None,
                bundle.run,
                np.concatenate([p.images for p in group]),
                np.concatenate([p.meta for p in group]),
            )
            RUN_SECONDS.observe(time.perf_counter() - started)
            BATCH_SIZE.observe(sum(len(p.images) for p in group))
        except Exception as exc:  # every waiting request gets the failure, the loop goes on
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        offset = 0
        for pending in group:
            end = offset + len(pending.images)
            if not pending.future.done():
                pending.future.set_result(scores.rows(offset, end))
            offset = end


# --- the model --------------------------------------------------------------------------------------


def shadow_uri(settings: Settings, model_uri: str) -> str | None:
    """What runs in shadow: the configured URI (``none``: nothing), else the ``challenger`` alias when
    the served model is the ``champion`` alias."""
    if settings.shadow_model_uri:
        return None if settings.shadow_model_uri.lower() == "none" else settings.shadow_model_uri
    champion = f"models:/{settings.registered_model}@champion"
    return f"models:/{settings.registered_model}@challenger" if model_uri == champion else None


class BodyPartModel(Model):  # type: ignore[misc]
    """``bodypart-router``: loads the bundle of a MODEL_URI and follows its alias."""

    def __init__(self, settings: Settings, model_uri: str | None = None) -> None:
        super().__init__(MODEL_NAME)
        self.settings = settings
        self.model_uri = model_uri or settings.model_uri or f"models:/{settings.registered_model}@champion"
        self.shadow_uri = shadow_uri(settings, self.model_uri)
        self.bundle: Bundle | None = None
        self.challenger: Bundle | None = None
        self.batcher = Batcher(settings.serve_max_batch_size, settings.serve_max_latency_ms / 1000.0)
        self.pool: DecodePool | None = None
        self.engine = True

    # lifecycle
    def load(self) -> bool:
        """Load the bundle if the URI resolves now; otherwise stay not-ready and let the poll find it."""
        from dicom_router.errors import ModelNotFound

        self.pool = self.pool or DecodePool(self.settings.serve_decode_workers)
        try:
            self._swap(self._resolve(self.model_uri))
        except ModelNotFound as exc:
            log.warning("no model yet (%s); polling every %.0f s", exc, self.settings.model_poll_s)
        self._follow_shadow()
        return self.ready

    def _resolve(self, uri: str) -> Bundle:
        """``models:/`` through the registry (MLflow loads only then), else ``inference.bundle_at``."""
        if uri.startswith("models:/"):
            from dicom_router.registry import load_bundle

            return load_bundle(self.settings, uri)
        return bundle_at(uri, self.settings)

    def _follow_shadow(self) -> None:
        """Load, swap or drop the challenger as its alias says (no alias: nothing in shadow)."""
        from dicom_router.errors import ModelNotFound

        if self.shadow_uri is None:
            return
        if self.challenger is not None and not self.shadow_uri.startswith("models:/"):
            return  # a bundle folder or URI: loaded once, like the served model
        try:
            if self.shadow_uri.startswith("models:/"):
                from dicom_router.registry import model_version

                version = str(model_version(self.settings, self.shadow_uri).version)
                if self.challenger is not None and self.challenger.version == version:
                    return
            challenger = self._resolve(self.shadow_uri)
        except ModelNotFound:
            if self.challenger is not None:
                log.info("shadow ended: %s no longer names a model", self.shadow_uri)
            self.challenger = None
            return
        if self.challenger is None or self.challenger.version != challenger.version:
            log.info("shadow: %s/%s answers beside the champion", challenger.name, challenger.version)
        self.challenger = challenger

    def _swap(self, bundle: Bundle) -> None:
        previous = self.bundle
        self.bundle = bundle
        self.ready = True
        if previous is None or previous.version != bundle.version:
            log.info(
                "serving %s/%s from %s on %s",
                bundle.name,
                bundle.version,
                bundle.path,
                bundle.session.get_providers()[0],
            )
        if previous is not None and previous.version != bundle.version:
            RELOADS.inc()

    async def start_engine(self) -> None:
        """The batcher and, for an MLflow alias, the alias poll: run inside the server's event loop."""
        tasks = [self.batcher.run()]
        aliases = [
            u for u in (self.model_uri, self.shadow_uri) if u and u.startswith("models:/") and "@" in u
        ]
        if aliases:
            tasks.append(self._follow_alias())
        await asyncio.gather(*tasks)

    async def _follow_alias(self) -> None:
        from dicom_router.registry import model_version

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                if "@" in self.model_uri:
                    version = await loop.run_in_executor(None, model_version, self.settings, self.model_uri)
                    if self.bundle is None or str(version.version) != self.bundle.version:
                        self._swap(await loop.run_in_executor(None, self._resolve, self.model_uri))
                await loop.run_in_executor(None, self._follow_shadow)
            except Exception as exc:  # the registry being away must not stop serving the current model
                log.warning("alias poll of %s failed: %s", self.model_uri, exc)

    async def healthy(self) -> bool:
        """KServe asks this before every request: a loaded model takes requests, also while a broken
        decode pool is being replaced (the request waits for the new pool rather than failing)."""
        return bool(self.ready)

    def ready_to_serve(self) -> bool:
        """The readiness probe's answer: a model loaded and a working decode pool."""
        return bool(self.ready) and self.pool is not None and self.pool.healthy

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()

    # KServe data plane
    async def preprocess(
        self,
        payload: dict[str, Any] | bytes | InferRequest,
        headers: dict[str, str] | None = None,  # noqa: ARG002  (KServe's signature)
    ) -> Inputs:
        bundle = self.bundle
        if bundle is None or self.pool is None:
            raise ModelNotReady(MODEL_NAME)
        config = bundle.preprocess
        if isinstance(payload, InferRequest):
            items, tensor = v2_inputs(payload)
            asked = {o.name for o in payload.request_outputs or []}
            want_embedding, want_statistics = "embedding" in asked, "image_statistics" in asked
            v2, request_id = True, payload.id
        else:
            v1 = v1_instances(payload)
            items = [x for x in v1 if isinstance(x, bytes)]
            arrays = [x for x in v1 if not isinstance(x, bytes)]
            if items and arrays:
                raise NotDicom("instances", "mix of DICOM and preprocessed instances in one request")
            tensor = np.stack(arrays) if arrays else None
            want_embedding = isinstance(payload, dict) and bool(payload.get("embedding"))
            want_statistics, v2, request_id = False, False, None
            asked = set()
        statistics: list[dict[str, float]] = []
        try:
            if tensor is not None:
                images = check_images(tensor, config)
                meta = metadata_for_tensor(len(images))
            else:
                prepared = await self.pool.prepare_all(items, config, self.settings.max_image_pixels)
                images = np.stack([p.image for p in prepared])
                meta = np.stack([p.meta for p in prepared])
                statistics = [p.statistics for p in prepared]
        except DicomInputError as exc:
            REJECTED.labels(type=exc.type).inc()
            raise
        wanted = want_statistics and bool(statistics)
        shadow = None
        challenger = self.challenger
        if v2 and "shadow_label" in asked and challenger is not None:
            if challenger.preprocess == config:
                shadow = Shadow(images, meta, challenger)
            elif items:  # prepared as the challenger was trained; its failure never fails the request
                try:
                    again = await self.pool.prepare_all(
                        items, challenger.preprocess, self.settings.max_image_pixels
                    )
                except DicomInputError as exc:
                    log.warning("shadow: the challenger's preprocessing refused the input (%s)", exc.type)
                else:
                    shadow = Shadow(
                        np.stack([p.image for p in again]), np.stack([p.meta for p in again]), challenger
                    )
        return Inputs(images, meta, bundle, v2, request_id, want_embedding, statistics, wanted, shadow)

    async def predict(
        self,
        inputs: Inputs,
        headers: dict[str, str] | None = None,  # noqa: ARG002  (KServe's signature)
    ) -> Outputs:
        champion = self.batcher.submit(inputs.images, inputs.meta, inputs.bundle)
        if inputs.shadow is None:
            return Outputs(await champion, inputs.bundle, inputs)
        shadow = self.batcher.submit(inputs.shadow.images, inputs.shadow.meta, inputs.shadow.bundle)
        answered, shadowed = await asyncio.gather(champion, shadow, return_exceptions=True)
        if isinstance(answered, BaseException):
            raise answered
        if isinstance(shadowed, BaseException):  # the challenger's failure is logged, never the answer's
            log.warning("shadow: the challenger failed: %s", shadowed.__class__.__name__)
            inputs.shadow = None
            return Outputs(answered, inputs.bundle, inputs)
        return Outputs(answered, inputs.bundle, inputs, shadowed.probabilities)

    async def postprocess(
        self,
        outputs: Outputs,
        headers: dict[str, str] | None = None,  # noqa: ARG002  (KServe's signature)
    ) -> dict[str, Any] | InferResponse:
        bundle = outputs.bundle
        scores = outputs.scores
        predictions = bundle.predictions(scores)
        threshold = self.settings.low_confidence
        for p in predictions:
            PREDICTIONS.labels(label=p.label).inc()
        if not outputs.inputs.v2:
            return {
                "predictions": [
                    {
                        **p.as_dict(),
                        "low_confidence": p.confidence < threshold,
                        "model": bundle.name,
                        "version": bundle.version,
                        **review_threshold(bundle),
                        **({"embedding": e.tolist()} if outputs.inputs.want_embedding else {}),
                    }
                    for p, e in zip(predictions, scores.embedding, strict=True)
                ]
            }
        n = len(predictions)
        result = [
            InferOutput("label", [n], "BYTES", [p.label for p in predictions]),
            InferOutput(
                "probabilities", [n, len(bundle.labels)], "FP32", scores.probabilities.reshape(-1).tolist()
            ),
            InferOutput("confidence", [n], "FP32", [p.confidence for p in predictions]),
            InferOutput("low_confidence", [n], "BOOL", [p.confidence < threshold for p in predictions]),
        ]
        if scores.novelty is not None:
            result.append(InferOutput(NOVELTY, [n], "FP32", scores.novelty.tolist()))
        if outputs.inputs.want_embedding:
            result.append(
                InferOutput(
                    "embedding", list(scores.embedding.shape), "FP32", scores.embedding.reshape(-1).tolist()
                )
            )
        if outputs.inputs.want_statistics:
            documents = [orjson.dumps(st).decode() for st in outputs.inputs.statistics]
            result.append(InferOutput("image_statistics", [n], "BYTES", documents))
        if outputs.inputs.shadow is not None and outputs.shadow_probabilities is not None:
            challenger = outputs.inputs.shadow.bundle
            answers = [challenger.prediction(row) for row in outputs.shadow_probabilities]
            result += [
                InferOutput("shadow_label", [n], "BYTES", [a.label for a in answers]),
                InferOutput("shadow_confidence", [n], "FP32", [a.confidence for a in answers]),
                InferOutput("shadow_version", [n], "BYTES", [challenger.version] * n),
            ]
        return InferResponse(
            outputs.inputs.request_id or "",
            MODEL_NAME,
            result,
            model_version=bundle.version,
            parameters={"labels": ",".join(bundle.labels), **review_threshold(bundle)},
        )

    def get_input_types(self) -> list[dict[str, Any]]:
        size = self.bundle.preprocess.image_size if self.bundle else -1
        return [
            {"name": "dicom", "datatype": "BYTES", "shape": [-1]},
            {"name": "image", "datatype": "FP32", "shape": [-1, 1, size, size]},
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "low_confidence", "datatype": "BOOL", "shape": [-1]},
            {"name": NOVELTY, "datatype": "FP32", "shape": [-1]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "image_statistics", "datatype": "BYTES", "shape": [-1]},
        ]
