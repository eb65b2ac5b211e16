"""Procedural CT-, MR- and X-ray-like phantoms with named organs and 0-3 lesions, in 2-D or as volumes, and an
ultrasound-like cine loop of a beating heart.

Images follow the radiological convention: the patient's right is on the image's left, anterior at the
top. Values are in the modality's units: Hounsfield units for CT, arbitrary signal for MR, raw detector
values (0-4095, bright = dense) for X-ray, 8-bit echo brightness for ultrasound. Every organ and lesion comes
with its mask; organ masks do not overlap and include the lesions inside them (as in LiTS/KiTS labels).

Volumes (:func:`make_volume_anatomy`) place each organ along the slices where it lies in the body (in a slab
of the upper abdomen the liver and spleen reach the top slices, the kidneys the bottom ones) and make each
lesion a sphere in millimetres, so that its extent in slices follows the slice spacing. Slice 0 is the most
inferior one, as in a NIfTI volume whose third axis points to the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# (modality, region) -> organ intensities; "background" is outside the body, "body" soft tissue/fat.
INTENSITIES: dict[tuple[str, str], dict[str, float]] = {
    ("CT", "abdomen"): {
        "background": -1000, "body": -90, "muscle": 45, "liver": 60, "spleen": 48, "right kidney": 32,
        "left kidney": 32, "spine": 500, "aorta": 45, "noise": 12,
    },
    ("CT", "chest"): {
        "background": -1000, "body": -90, "muscle": 45, "right lung": -840, "left lung": -840, "heart": 42,
        "spine": 500, "aorta": 45, "noise": 14,
    },
    ("MR", "abdomen"): {
        "background": 5, "body": 650, "muscle": 160, "liver": 260, "spleen": 420, "right kidney": 380,
        "left kidney": 380, "spine": 220, "aorta": 60, "noise": 18,
    },
    ("X-ray", "chest"): {
        "background": 150, "body": 1900, "muscle": 2100, "right lung": 700, "left lung": 700, "heart": 2500,
        "spine": 3100, "aorta": 2300, "noise": 40,
    },
}
# Where lesions may grow, per (modality, region).
LESION_HOSTS = {
    ("CT", "abdomen"): ("liver", "spleen", "right kidney", "left kidney"),
    ("MR", "abdomen"): ("liver", "spleen", "right kidney", "left kidney"),
    ("CT", "chest"): ("right lung", "left lung"),
    ("X-ray", "chest"): ("right lung", "left lung"),
}
# The organs that prompts may name, per region (order is the drawing order).
ORGANS = {
    "abdomen": ("liver", "spleen", "right kidney", "left kidney"),
    "chest": ("right lung", "left lung", "heart"),
}
KINDS = (("CT", "abdomen"), ("CT", "chest"), ("MR", "abdomen"), ("X-ray", "chest"))
# Least gap between two lesions, as a fraction of the image side (7 px at 224, a quarter of a merged token's
# cell): touching lesions read as one blob, and "how many lesions?" would have no answer in the picture.
LESION_GAP = 0.03
MAX_WOBBLE = 0.15  # the largest wobble amplitude drawn below


@dataclass
class Ellipsoid:
    """An ellipsoid in normalised image coordinates (x, y in 0..1 of the image; z in slices)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0
    cz: float = 0.0
    rz: float = 1e9  # effectively a cylinder: 2-D phantoms use z = 0

    def mask(self, size: int, z: float = 0.0, wobble: tuple[float, int, float] | None = None) -> np.ndarray:
        """Boolean ``[size, size]`` cross-section at slice ``z`` (``wobble`` = amplitude, lobes, phase)."""
        dz = (z - self.cz) / self.rz
        if abs(dz) >= 1.0:
            return np.zeros((size, size), dtype=bool)
        shrink = float(np.sqrt(1.0 - dz * dz))
        out = np.zeros((size, size), dtype=bool)
        # only the pixels the outline can reach are computed (each pixel's test is the same either way)
        reach = max(self.rx, self.ry) * shrink * (1.0 + (abs(wobble[0]) if wobble is not None else 0.0))
        x0, x1 = _pixel_span(self.cx, reach, size)
        y0, y1 = _pixel_span(self.cy, reach, size)
        if x0 >= x1 or y0 >= y1:
            return out
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        x, y = xx / size - self.cx, yy / size - self.cy
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = (c * x + s * y) / (self.rx * shrink), (-s * x + c * y) / (self.ry * shrink)
        radius = np.sqrt(u * u + v * v)
        limit = 1.0
        if wobble is not None:
            amplitude, lobes, phase = wobble
            limit = 1.0 + amplitude * np.sin(lobes * np.arctan2(v, u) + phase)
        out[y0:y1, x0:x1] = radius <= limit
        return out


def _pixel_span(centre: float, reach: float, size: int) -> tuple[int, int]:
    """The pixel range ``[start, stop)`` that covers ``centre +- reach`` (normalised), with two pixels to spare."""
    return max(0, int(np.floor((centre - reach) * size)) - 2), min(size, int(np.ceil((centre + reach) * size)) + 2)


@dataclass
class Lesion:
    """A lesion: its shape, host organ and intensity offset."""

    shape: Ellipsoid
    host: str
    contrast: float
    wobble: tuple[float, int, float]


@dataclass
class Anatomy:
    """A body with organs and lesions; :meth:`render` draws any slice of it."""

    modality: str
    region: str
    size: int
    body: Ellipsoid
    organs: dict[str, list[Ellipsoid]]
    extras: dict[str, list[Ellipsoid]]  # muscle, spine, aorta: drawn, never named in prompts
    lesions: list[Lesion] = field(default_factory=list)
    spacing_mm: float = 1.6
    slice_mm: float | None = None  # volumes: the distance between slices

    def render(self, rng: np.random.Generator, z: float = 0.0) -> Slice:
        """Values and masks of slice ``z`` (noise drawn from ``rng``)."""
        levels = INTENSITIES[(self.modality, self.region)]
        size = self.size
        values = np.full((size, size), levels["background"], dtype=np.float32)
        body = self.body.mask(size, z)
        values[body] = levels["body"]
        for name, parts in self.extras.items():
            for part in parts:
                values[part.mask(size, z) & body] = levels[name]
        masks: dict[str, np.ndarray] = {}
        for name in ORGANS[self.region]:
            region = np.zeros((size, size), dtype=bool)
            for part in self.organs[name]:
                region |= part.mask(size, z)
            region &= body
            for other in masks.values():
                other &= ~region  # later organs win where shapes touch
            masks[name] = region
            values[region] = levels[name]
        lesion_masks = []
        for lesion in self.lesions:
            shape = lesion.shape.mask(size, z, lesion.wobble) & masks[lesion.host]
            values[shape] += lesion.contrast
            lesion_masks.append(shape)
        if self.modality == "X-ray":
            values = _xray_projection(values, body)
        values += rng.normal(0.0, levels["noise"], values.shape).astype(np.float32)
        return Slice(self, values, masks, lesion_masks)


@dataclass
class Slice:
    """One rendered image: values in modality units, organ masks and one mask per visible lesion."""

    anatomy: Anatomy
    values: np.ndarray
    organs: dict[str, np.ndarray]
    lesions: list[np.ndarray]

    def visible_lesions(self, min_pixels: int = 12) -> list[tuple[Lesion, np.ndarray]]:
        """Lesions with at least ``min_pixels`` pixels in this slice, with their masks."""
        return [
            (lesion, mask)
            for lesion, mask in zip(self.anatomy.lesions, self.lesions, strict=True)
            if int(mask.sum()) >= min_pixels
        ]


def _reach(shape: Ellipsoid, size: int) -> np.ndarray:
    """Where a lesion of ``shape`` may draw in any slice and with any wobble, padded by half the lesion gap:
    two lesions whose reaches do not meet are at least :data:`LESION_GAP` apart everywhere."""
    pad = LESION_GAP / 2
    grown = Ellipsoid(
        shape.cx, shape.cy, shape.rx * (1 + MAX_WOBBLE) + pad, shape.ry * (1 + MAX_WOBBLE) + pad, shape.angle
    )
    return grown.mask(size)


def _xray_projection(values: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A radiograph look: soft edges and a brighter centre line (summed depth), lungs stay dark."""
    blurred = _gaussian_blur(values, 1.2)
    size = values.shape[1]
    xx = np.arange(size, dtype=np.float32) / size
    depth = 1.0 + 0.25 * np.exp(-((xx - 0.5) ** 2) / 0.02)  # the mediastinum sums more tissue
    return np.where(body, blurred * depth[None, :], blurred)


def _gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    radius = max(1, int(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = values.astype(np.float32)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        out = windows @ taps
    return out


def _jitter(rng: np.random.Generator, value: float, spread: float) -> float:
    return float(value + rng.uniform(-spread, spread))


def make_anatomy(
    rng: np.random.Generator,
    modality: str,
    region: str,
    size: int = 224,
    num_lesions: int | None = None,
    depth: int = 1,
) -> Anatomy:
    """A random body of the given kind with ``num_lesions`` lesions (0-3 at random when None).

    ``depth`` > 1 makes the organs ellipsoids spanning about that many slices (for volumes).
    """
    if (modality, region) not in INTENSITIES:
        raise ValueError(f"no phantom for {modality} {region}; choose from {sorted(INTENSITIES)}")
    zc, zr = (depth - 1) / 2.0, (max(depth, 1) * 0.75 if depth > 1 else 1e9)
    body, organs, extras = _layout(rng, modality, region, zc, zr)
    anatomy = Anatomy(modality, region, size, body, organs, extras, spacing_mm=float(rng.uniform(1.4, 1.8)))
    count = int(rng.integers(0, 4)) if num_lesions is None else int(num_lesions)
    tries = 0
    while len(anatomy.lesions) < count and tries < 200:
        tries += 1
        lesion = _draw_lesion(rng, anatomy, zc, depth)
        if lesion is not None:
            anatomy.lesions.append(lesion)
    return anatomy


def _layout(
    rng: np.random.Generator, modality: str, region: str, zc: float, zr: float
) -> tuple[Ellipsoid, dict[str, list[Ellipsoid]], dict[str, list[Ellipsoid]]]:
    """The body outline, the named organs and the unnamed extras (muscle, spine, aorta), jittered by ``rng``,
    centred on slice ``zc`` with depth radius ``zr``."""
    j = lambda v, s=0.02: _jitter(rng, v, s)  # noqa: E731

    def part(cx, cy, rx, ry, angle=0.0, rz_scale=1.0):
        return Ellipsoid(j(cx), j(cy), j(rx, 0.015), j(ry, 0.015), j(angle, 0.15), zc, zr * rz_scale)

    body = Ellipsoid(0.5, j(0.52, 0.01), j(0.44 if region == "abdomen" else 0.45, 0.02), j(0.34, 0.02), 0.0, zc, 1e9)
    if region == "abdomen":
        organs = {
            # patient's right = image left
            "liver": [part(0.33, 0.45, 0.17, 0.14, 0.3), part(0.42, 0.38, 0.12, 0.07, -0.2)],
            "spleen": [part(0.72, 0.44, 0.07, 0.10, -0.4)],
            "right kidney": [part(0.36, 0.66, 0.055, 0.075, 0.35, 0.8)],
            "left kidney": [part(0.64, 0.66, 0.055, 0.075, -0.35, 0.8)],
        }
        extras = {
            "muscle": [part(0.42, 0.74, 0.05, 0.06), part(0.58, 0.74, 0.05, 0.06)],
            "spine": [Ellipsoid(0.5, j(0.72, 0.01), 0.045, 0.045, 0.0, zc, 1e9)],
            "aorta": [Ellipsoid(j(0.52, 0.01), j(0.62, 0.01), 0.022, 0.022, 0.0, zc, 1e9)],
        }
    else:
        organs = {
            "right lung": [part(0.31, 0.48, 0.15, 0.24 if modality == "X-ray" else 0.2, 0.05)],
            "left lung": [part(0.69, 0.48, 0.14, 0.23 if modality == "X-ray" else 0.19, -0.05)],
            "heart": [part(0.56, 0.5, 0.11, 0.1, 0.4)],
        }
        extras = {
            "muscle": [],
            "spine": [Ellipsoid(0.5, j(0.78 if modality == "CT" else 0.5, 0.01), 0.04,
                                0.04 if modality == "CT" else 0.4, 0.0, zc, 1e9)],
            "aorta": [Ellipsoid(j(0.47, 0.01), j(0.6, 0.01), 0.025, 0.025, 0.0, zc, 1e9)],
        }
    return body, organs, extras


def _draw_lesion(rng: np.random.Generator, anatomy: Anatomy, zc: float, depth: int) -> Lesion | None:
    """One random lesion in one of the anatomy's host organs, or None when the draw does not fit: it must lie
    wholly inside its organ and stay :data:`LESION_GAP` apart from the lesions already placed."""
    modality, region, size = anatomy.modality, anatomy.region, anatomy.size
    hosts = LESION_HOSTS[(modality, region)]
    host = hosts[int(rng.integers(0, len(hosts)))]
    organ = anatomy.organs[host][0]
    radius = float(rng.uniform(0.018, 0.055))
    shape = Ellipsoid(
        float(organ.cx + rng.uniform(-0.6, 0.6) * organ.rx),
        float(organ.cy + rng.uniform(-0.6, 0.6) * organ.ry),
        radius * float(rng.uniform(0.8, 1.2)),
        radius * float(rng.uniform(0.8, 1.2)),
        float(rng.uniform(0, np.pi)),
        zc + float(rng.uniform(-0.2, 0.2)) * depth,
        max(radius * size * 0.5, 1.5) if depth > 1 else 1e9,
    )
    mask = shape.mask(size, zc)
    host_mask = np.zeros((size, size), dtype=bool)
    for piece in anatomy.organs[host]:
        host_mask |= piece.mask(size, zc)
    # whole lesion inside its organ, and apart from the other lesions in every slice
    if mask.sum() < 20 or (mask & ~host_mask).any():
        return None
    reach = _reach(shape, size)
    if any((reach & _reach(other.shape, size)).any() for other in anatomy.lesions):
        return None
    return _finish_lesion(rng, shape, host, modality, region)


def _finish_lesion(rng: np.random.Generator, shape: Ellipsoid, host: str, modality: str, region: str) -> Lesion:
    """A placed lesion's look: its contrast against the host organ and the wobble of its outline."""
    levels = INTENSITIES[(modality, region)]
    contrast_sign = {"CT": -1.0, "MR": 1.0, "X-ray": 1.0}[modality]
    if region == "chest":
        contrast = levels["muscle"] - levels[host] + float(rng.uniform(-20, 20))  # solid nodule in air
    else:
        magnitude = float(rng.uniform(35, 70)) if modality == "CT" else float(rng.uniform(200, 400))
        contrast = contrast_sign * magnitude * (1 if rng.uniform() < 0.8 else -1)
    wobble = (float(rng.uniform(0.0, MAX_WOBBLE)), int(rng.integers(2, 6)), float(rng.uniform(0, 2 * np.pi)))
    return Lesion(shape, host, contrast, wobble)


# --- volumes -------------------------------------------------------------------------------------------------
# Where each organ lies along the slices of a volume: (centre offset, half extent), both as fractions of the
# volume's depth from its middle slice (positive = superior). Unlisted parts (muscle) span every slice.
VOLUME_EXTENTS: dict[str, dict[str, tuple[float, float]]] = {
    "abdomen": {"liver": (0.15, 0.7), "spleen": (0.2, 0.4), "right kidney": (-0.2, 0.35),
                "left kidney": (-0.15, 0.35)},
    "chest": {"right lung": (0.05, 0.8), "left lung": (0.05, 0.8), "heart": (-0.2, 0.45)},
}
MIN_LESION_PIXELS = 20  # a lesion's cross-section at its centre slice, at least


def make_volume_anatomy(
    rng: np.random.Generator,
    modality: str,
    region: str,
    size: int,
    depth: int,
    spacing_mm: float,
    slice_mm: float,
    num_lesions: int | None = None,
) -> Anatomy:
    """A body of ``depth`` slices of ``size`` x ``size`` pixels (``spacing_mm`` per pixel, ``slice_mm`` between
    slices) with organs placed along the slices (:data:`VOLUME_EXTENTS`) and ``num_lesions`` spherical lesions
    (0-3 at random when None), each wholly inside its organ at its centre slice and apart from the others."""
    if (modality, region) not in INTENSITIES or modality == "X-ray":
        raise ValueError(f"no volume phantom for {modality} {region}; choose CT or MR of {sorted(ORGANS)}")
    if depth < 4:
        raise ValueError(f"a volume needs at least 4 slices, got {depth}")
    zc = (depth - 1) / 2.0
    body, organs, extras = _layout(rng, modality, region, zc, depth * 0.75)
    for name, (offset, extent) in VOLUME_EXTENTS[region].items():
        centre = zc + _jitter(rng, offset, 0.05) * depth
        half = _jitter(rng, extent, 0.05) * depth
        organs[name] = [
            Ellipsoid(p.cx, p.cy, p.rx, p.ry, p.angle, centre, half * (p.rz / (depth * 0.75))) for p in organs[name]
        ]
    anatomy = Anatomy(modality, region, size, body, organs, extras, spacing_mm=spacing_mm, slice_mm=slice_mm)
    count = int(rng.integers(0, 4)) if num_lesions is None else int(num_lesions)
    tries = 0
    while len(anatomy.lesions) < count and tries < 200:
        tries += 1
        lesion = _draw_volume_lesion(rng, anatomy, depth)
        if lesion is not None:
            anatomy.lesions.append(lesion)
    return anatomy


def _organ_mask(anatomy: Anatomy, name: str, z: float) -> np.ndarray:
    mask = np.zeros((anatomy.size, anatomy.size), dtype=bool)
    for piece in anatomy.organs[name]:
        mask |= piece.mask(anatomy.size, z)
    return mask


def _draw_volume_lesion(rng: np.random.Generator, anatomy: Anatomy, depth: int) -> Lesion | None:
    """One spherical lesion (radius in mm alike in-plane and across slices) centred on a slice where its host
    organ is, or None when the draw does not fit (outside its organ, or too near another lesion)."""
    modality, region, size = anatomy.modality, anatomy.region, anatomy.size
    hosts = LESION_HOSTS[(modality, region)]
    host = hosts[int(rng.integers(0, len(hosts)))]
    organ = anatomy.organs[host][0]
    radius = float(rng.uniform(0.025, 0.06))
    low, high = max(1.0, organ.cz - 0.6 * organ.rz), min(depth - 2.0, organ.cz + 0.6 * organ.rz)
    if low > high:
        return None
    cz = float(round(rng.uniform(low, high)))
    rz = max(radius * size * anatomy.spacing_mm / float(anatomy.slice_mm or anatomy.spacing_mm), 1.0)
    shape = Ellipsoid(
        float(organ.cx + rng.uniform(-0.6, 0.6) * organ.rx),
        float(organ.cy + rng.uniform(-0.6, 0.6) * organ.ry),
        radius * float(rng.uniform(0.85, 1.15)),
        radius * float(rng.uniform(0.85, 1.15)),
        float(rng.uniform(0, np.pi)),
        cz,
        rz,
    )
    mask = shape.mask(size, cz)
    if mask.sum() < MIN_LESION_PIXELS or (mask & ~_organ_mask(anatomy, host, cz)).any():
        return None
    reach = _reach(shape, size)
    if any((reach & _reach(other.shape, size)).any() for other in anatomy.lesions):
        return None
    return _finish_lesion(rng, shape, host, modality, region)


# --- ultrasound cine -----------------------------------------------------------------------------------------
# Echo brightness (0-1) of each tissue in the cine phantom; the cavities are anechoic (dark).
ECHO_LEVELS = {"tissue": 0.42, "myocardium": 0.85, "cavity": 0.06}
# Label values of the cine's structures, in drawing order.
CINE_STRUCTURES = {"left ventricle": 1, "myocardium": 2, "right ventricle": 3}


@dataclass
class Cine:
    """An ultrasound-like clip: ``frames`` ``[N, H, W]`` uint8 and ``labels`` ``[N, H, W]`` uint8 (values of
    :data:`CINE_STRUCTURES`, 0 elsewhere), shown at ``fps`` frames per second."""

    frames: np.ndarray
    labels: np.ndarray
    fps: float
    heart_rate: float  # beats per minute

    def mask(self, name: str) -> np.ndarray:
        """``[N, H, W]`` boolean mask of one structure."""
        return self.labels == CINE_STRUCTURES[name]


def make_cine(rng: np.random.Generator, num_frames: int, size: int) -> Cine:
    """A parasternal short-axis-like loop: a sector of speckle with the left ventricle (a dark cavity in a bright
    myocardial ring) and the right ventricle (a dark crescent beside it), both contracting and relaxing with
    the heartbeat while the heart drifts a little with breathing."""
    fps = float(rng.choice([20.0, 25.0, 30.0]))
    heart_rate = float(rng.uniform(60, 100))
    phase = float(rng.uniform(0, 2 * np.pi))
    cx, cy = _jitter(rng, 0.54, 0.04), _jitter(rng, 0.55, 0.04)
    radius = _jitter(rng, 0.13, 0.02)
    wall = _jitter(rng, 0.05, 0.008)
    drift = (float(rng.uniform(0.005, 0.02)), float(rng.uniform(0, 2 * np.pi)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    x, y = xx / size, yy / size
    sector = _sector(x, y)
    frames = np.zeros((num_frames, size, size), dtype=np.uint8)
    labels = np.zeros((num_frames, size, size), dtype=np.uint8)
    for k in range(num_frames):
        beat = 0.5 - 0.5 * np.cos(2 * np.pi * heart_rate / 60.0 * k / fps + phase)  # 0 relaxed, 1 contracted
        dx = drift[0] * np.sin(2 * np.pi * 0.25 * k / fps + drift[1])
        cavity_r = radius * (1.0 - 0.3 * beat)
        outer_r = cavity_r + wall * (1.0 + 0.4 * beat)  # the wall thickens as the ventricle contracts
        distance = np.hypot(x - (cx + dx), (y - cy) / 1.05)
        lv, ring = distance <= cavity_r, (distance > cavity_r) & (distance <= outer_r)
        rv_shape = np.hypot((x - (cx + dx - outer_r * 1.05)) / (0.55 * outer_r), (y - cy) / (1.1 * outer_r)) <= 1.0
        rv = rv_shape & ~(distance <= outer_r + 0.012) & sector
        label = np.zeros((size, size), dtype=np.uint8)
        label[lv & sector] = CINE_STRUCTURES["left ventricle"]
        label[ring & sector] = CINE_STRUCTURES["myocardium"]
        label[rv] = CINE_STRUCTURES["right ventricle"]
        labels[k] = label
        frames[k] = _echo_frame(rng, label, sector, y)
    return Cine(frames, labels, fps, heart_rate)


def _sector(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The fan a phased-array probe at the top centre images: 38 degrees either side, 0.95 of the image deep."""
    angle = np.arctan2(x - 0.5, y + 0.02)
    return (np.abs(angle) <= np.deg2rad(38)) & (np.hypot(x - 0.5, y + 0.02) <= 0.97)


def _echo_frame(rng: np.random.Generator, label: np.ndarray, sector: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One frame's brightness: tissue echo levels times Rayleigh speckle, blurred a little, fading with depth."""
    level = np.full(label.shape, ECHO_LEVELS["tissue"], dtype=np.float32)
    level[label == CINE_STRUCTURES["myocardium"]] = ECHO_LEVELS["myocardium"]
    level[(label == CINE_STRUCTURES["left ventricle"]) | (label == CINE_STRUCTURES["right ventricle"])] = (
        ECHO_LEVELS["cavity"]
    )
    speckle = rng.rayleigh(0.8, label.shape).astype(np.float32)
    echo = _gaussian_blur(level * speckle, 0.8) * np.exp(-0.6 * y)
    return np.where(sector, np.clip(echo * 230.0, 0, 255), 0).astype(np.uint8)
