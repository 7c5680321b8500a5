"""Request decoding with limits: bytes in, checked tensors and parameters out.

Everything a request can get wrong is found here, before the request joins a batch, so a
bad request can never fail the good ones it would have been batched with. Each problem is a
:class:`~fastsal.serve.errors.ServeError` whose message says what was wrong and what to send
instead. Nothing here knows about HTTP frameworks.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastsal.jobs.images import Preprocess, to_tensor
from fastsal.serve.errors import BadRequest, TooLarge

METHODS = ("gradient", "deconvnet", "guided")
ENCODINGS = ("png", "f16")
PARAMETERS = ("encoding", "method", "top_k")
IMAGE_FORMATS = "JPEG, PNG, WebP, BMP, TIFF or GIF"


@dataclass(frozen=True)
class Limits:
    """What one request may hold. Over a limit is a 413."""

    max_body_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    max_instances: int = 64  # images per request


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    preprocess: Preprocess
    num_classes: int
    class_names: Optional[Sequence[str]] = None
    default_method: str = "guided"
    max_top_k: int = 1  # 1 when the explainer has no top-k support


@dataclass(frozen=True)
class Params:
    encoding: str = "png"
    method: str = "guided"
    top_k: int = 1


@dataclass
class Instance:
    tensor: torch.Tensor  # (3, H, W) float32, the model's input
    image_size: Tuple[int, int]  # (width, height) of the image as decoded (EXIF-rotated)
    target: Optional[int] = None  # None: the predicted class


@dataclass
class DecodedRequest:
    instances: List[Instance]
    params: Params
    json_body: bool = False  # raw-image bodies answer with one instance too, as JSON
    extra: Dict[str, Any] = field(default_factory=dict)


# -- images -----------------------------------------------------------------------------
def decode_image(data: bytes, pre: Preprocess, limits: Limits,
                 where: str = "the body") -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Decode image bytes to the model's input ``(3, H, W)`` and the image's ``(width, height)``.

    The pixel count is checked from the header, before any pixel is decoded. EXIF
    orientation is applied, so maps are in the coordinates people see; transparent pixels
    are put over white, as a viewer shows them.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadRequest(f"{where} is empty: send the bytes of an image file ({IMAGE_FORMATS})")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"{where}: {exc}") from None
    except UnidentifiedImageError:
        head = data[:8]
        looks_json = data.lstrip()[:1] in (b"{", b"[")
        hint = " (it looks like JSON: send it with Content-Type: application/json)" if looks_json else ""
        raise BadRequest(f"{where} is not an image ({len(data)} bytes starting with {head!r}){hint}: "
                         f"send a {IMAGE_FORMATS} file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"{where} is a truncated or corrupt image ({exc}): send the whole {IMAGE_FORMATS} file") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise TooLarge(f"{where} is {w}x{h} = {w * h:,} pixels; this server takes at most {limits.max_pixels:,} "
                       "pixels per image (fastsal serve --max-pixels): send a smaller image")
    if w == 0 or h == 0:
        raise BadRequest(f"{where} is an image of size {w}x{h}")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"{where} is a truncated or corrupt image ({exc}): send the whole file") from None
    return to_tensor(im, pre), im.size


def b64decode(text: Any, where: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet; a ``data:...;base64,`` prefix is allowed)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest(f"{where} must be base64 text, got binary bytes: base64-encode the image file") from None
    if not isinstance(text, str):
        raise BadRequest(f"{where} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # line breaks of MIME-style base64
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    if len(text) % 4:
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where} is not valid base64 ({exc})") from None


# -- parameters and targets ---------------------------------------------------------------
def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise BadRequest(f"{where} must be an integer, got {value!r}")
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise BadRequest(f"{where} must be an integer, got {value!r}") from None
    return value


def parse_params(raw: Any, info: ModelInfo, verb: str = "explain") -> Params:
    """The ``parameters`` object of a V1 body (or the query string of a raw-image body)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest(f'"parameters" must be an object, got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(PARAMETERS))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(map(repr, unknown))}: known are {', '.join(PARAMETERS)}")
    encoding = raw.get("encoding", "png")
    if encoding not in ENCODINGS:
        raise BadRequest(f"unknown encoding {encoding!r}: use png (8-bit map with its scale) or f16 (base64 float16)")
    method = raw.get("method", info.default_method)
    if method not in METHODS:
        raise BadRequest(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    top_k = _int(raw.get("top_k", 1), '"top_k"')
    if top_k < 1:
        raise BadRequest(f'"top_k" must be at least 1, got {top_k}')
    if top_k > info.num_classes:
        raise BadRequest(f'"top_k" {top_k} is more than the model\'s {info.num_classes} classes')
    if verb == "explain" and top_k > info.max_top_k:
        raise BadRequest(f'"top_k" {top_k} is not supported by this server (this fastsal\'s Explainer explains one '
                         "class per image): send top_k 1, or one request per target")
    return Params(encoding=encoding, method=method, top_k=top_k)


def parse_target(value: Any, info: ModelInfo, where: str) -> Optional[int]:
    """None (the predicted class), a class index 0..C-1, or a class name."""
    if value is None:
        return None
    if isinstance(value, str) and info.class_names and value in info.class_names:
        return list(info.class_names).index(value)
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        names = f": one of {', '.join(info.class_names)}" if info.class_names else ""
        raise BadRequest(f"{where} {value!r} is not a class index or a class name of this model{names}")
    target = _int(value, where)
    if not 0 <= target < info.num_classes:
        raise BadRequest(f"{where} {target} is out of range: the model has {info.num_classes} classes "
                         f"(0..{info.num_classes - 1})")
    return target


# -- V1 bodies ----------------------------------------------------------------------------
def _looks_like_json(body: bytes, content_type: Optional[str]) -> bool:
    if content_type and content_type.split(";")[0].strip().lower() in ("application/json", "text/json"):
        return True
    return body.lstrip()[:1] in (b"{", b"[")


def _query(query: Optional[str]) -> Dict[str, str]:
    if not query:
        return {}
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return {k: v for k, v in pairs}


def parse_v1(body: bytes, info: ModelInfo, limits: Limits, content_type: Optional[str] = None,
             query: Optional[str] = None, verb: str = "explain") -> DecodedRequest:
    """A V1 ``:predict``/``:explain`` body: raw image bytes (parameters and ``target`` in the query
    string), or ``{"instances": [{"image": {"b64": ...}, "target": ...}], "parameters": {...}}``."""
    if len(body) > limits.max_body_bytes:
        raise TooLarge(f"the body is {len(body):,} bytes; this server takes at most {limits.max_body_bytes:,} "
                       "(fastsal serve --max-body-mb)")
    if not body:
        raise BadRequest("the body is empty: send an image file's bytes, or JSON "
                         '{"instances": [{"image": {"b64": "..."}}]}')
    if not _looks_like_json(body, content_type):
        q = _query(query)
        target = q.pop("target", None)
        params = parse_params(q, info, verb)
        t = parse_target(target, info, "target") if target not in (None, "") else None
        if t is not None and params.top_k > 1:
            raise BadRequest("give either a target or top_k > 1, not both")
        tensor, size = decode_image(body, info.preprocess, limits)
        return DecodedRequest([Instance(tensor, size, t)], params)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON ({exc}): send an image file's bytes, or JSON "
                         '{"instances": [{"image": {"b64": "..."}}]}') from None
    if not isinstance(doc, dict) or "instances" not in doc:
        got = f"an object with keys {sorted(doc)[:8]}" if isinstance(doc, dict) else type(doc).__name__
        raise BadRequest(f'a JSON body must be an object with "instances" (a list), got {got}')
    unknown = sorted(set(doc) - {"instances", "parameters", "id"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}: a body has instances and parameters")
    items = doc["instances"]
    if not isinstance(items, list) or not items:
        raise BadRequest('"instances" must be a non-empty list of {"image": {"b64": "..."}, "target": ...}')
    if len(items) > limits.max_instances:
        raise TooLarge(f'"instances" holds {len(items)} images; this server takes at most {limits.max_instances} '
                       "per request (fastsal serve --max-instances): split the request")
    params = parse_params(doc.get("parameters"), info, verb)
    raw_images = []
    targets = []
    for i, item in enumerate(items):
        where = f"instances[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f'{where} must be an object {{"image": {{"b64": "..."}}, "target": ...}}, '
                             f"got {type(item).__name__}")
        unknown = sorted(set(item) - {"image", "image_bytes", "b64", "target"})
        if unknown:
            raise BadRequest(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}: use image and target")
        image = item.get("image", item.get("image_bytes", item.get("b64")))
        if isinstance(image, dict):
            if "b64" not in image:
                raise BadRequest(f'{where}.image must be {{"b64": "<base64 of an image file>"}}')
            image, key = image["b64"], f"{where}.image.b64"
        else:
            key = f"{where}.image"
        if image is None:
            raise BadRequest(f'{where} has no image: give {{"image": {{"b64": "<base64 of an image file>"}}}}')
        raw_images.append((b64decode(image, key), key))
        t = parse_target(item.get("target"), info, f"{where}.target")
        if t is not None and params.top_k > 1:
            raise BadRequest(f"{where}: give either a target or top_k > 1, not both")
        targets.append(t)
    instances = []
    for (data, key), t in zip(raw_images, targets):
        tensor, size = decode_image(data, info.preprocess, limits, where=key)
        instances.append(Instance(tensor, size, t))
    return DecodedRequest(instances, params, json_body=True)


# -- V2 (Open Inference Protocol) ---------------------------------------------------------
V2_OUTPUTS = ("class", "score", "saliency")


@dataclass
class V2Input:
    """One input tensor of a V2 request, framework-free."""

    name: str
    datatype: str
    shape: List[int]
    data: Sequence[Any]  # flat, row-major


def parse_v2(inputs: Sequence[V2Input], parameters: Optional[dict], outputs: Optional[Sequence[str]],
             info: ModelInfo, limits: Limits) -> DecodedRequest:
    """A V2 ``infer`` request: a BYTES input ``image`` of base64 images ``[N]``, an optional INT
    input ``target`` ``[N]``, parameter ``method``; outputs ``class``, ``score`` and, when asked
    for, ``saliency`` (float16 ``[N, H, W]``)."""
    by_name = {}
    for inp in inputs:
        if inp.name in by_name:
            raise BadRequest(f"input {inp.name!r} is given twice")
        by_name[inp.name] = inp
    unknown = sorted(set(by_name) - {"image", "target"})
    if unknown or "image" not in by_name:
        raise BadRequest(f"inputs must be 'image' (BYTES [N], base64 image files) and optionally 'target' "
                         f"(INT64 [N]); got {sorted(by_name) or 'none'}")
    image = by_name["image"]
    if image.datatype != "BYTES":
        raise BadRequest(f"input 'image' must have datatype BYTES (base64 image files), got {image.datatype}")
    n = len(image.data)
    if n == 0:
        raise BadRequest("input 'image' holds no images")
    if n > limits.max_instances:
        raise TooLarge(f"input 'image' holds {n} images; this server takes at most {limits.max_instances} per "
                       "request (fastsal serve --max-instances)")
    if math.prod(image.shape) != n or not image.shape or image.shape[0] != n:
        raise BadRequest(f"input 'image' has shape {image.shape} but {n} elements: use shape [{n}]")
    params = dict(parameters or {})
    for key in ("binary_data_output",):  # protocol-level, not ours
        params.pop(key, None)
    if "encoding" in params or "top_k" in params:
        raise BadRequest("V2 infer takes only the parameter 'method'; the saliency output is float16 [N, H, W] "
                         "(use V1 :explain for png maps or top_k)")
    p = parse_params(params, info)
    wanted = list(outputs) if outputs else ["class", "score"]
    bad = sorted(set(wanted) - set(V2_OUTPUTS))
    if bad:
        raise BadRequest(f"unknown output(s) {bad}: this model has outputs {', '.join(V2_OUTPUTS)}")
    targets: List[Optional[int]] = [None] * n
    if "target" in by_name:
        tin = by_name["target"]
        if tin.datatype not in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"):
            raise BadRequest(f"input 'target' must be an integer tensor [N], got {tin.datatype}")
        if len(tin.data) != n:
            raise BadRequest(f"input 'target' has {len(tin.data)} values for {n} images")
        targets = [parse_target(int(v), info, f"target[{i}]") for i, v in enumerate(tin.data)]
    instances = []
    for i, element in enumerate(image.data):
        where = f"image[{i}]"
        tensor, size = decode_image(b64decode(element, where), info.preprocess, limits, where=where)
        instances.append(Instance(tensor, size, targets[i]))
    return DecodedRequest(instances, p, extra={"outputs": wanted})
