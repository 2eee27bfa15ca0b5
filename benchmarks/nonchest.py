"""Non-chest images for measuring the scope guard, written as PNG from sources on this machine.

Two sets, kept apart on purpose:

* :func:`assemble_non_chest` - the set the issue describes: scikit-image's bundled samples
  (photographs, micrographs, text, a CT phantom ...), blank/constant, noise and gradient
  images, rendered text pages, drawn "screenshots", and ``medical``: CT, MR, nuclear
  medicine, ultrasound, a segmentation and a secondary-capture image from pydicom's test
  files, their pixel data saved as PNG (so no DICOM header can help the guard).
* :func:`assemble_confirmation` - assembled *after* the guard with the layout check was
  chosen, from sources not looked at before: matplotlib's sample data (two photographs,
  a logo, an MR slice, two elevation maps, a density plot) and ten faces of scikit-image's
  LFW subset. The guard's design never saw it; its figure is the fairer one.

Each writes ``folder/<kind>/<name>.png``; a source missing here is skipped and said.
"""

from __future__ import annotations

import gzip
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SKIMAGE_SAMPLES = (  # bundled with scikit-image (no download)
    "astronaut", "brick", "camera", "cat", "checkerboard", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
    "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text",
    "shepp_logan_phantom", "cell", "binary_blobs",
)  # fmt: skip
PYDICOM_FILES = (  # one file per distinct image (pydicom ships several encodings of some)
    "CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm", "examples_overlay.dcm",
    "MR_small.dcm", "JPEG2000.dcm", "examples_rgb_color.dcm", "examples_palette.dcm",
    "examples_ybr_color.dcm", "liver_1frame.dcm", "image_dfl.dcm",
)  # fmt: skip
LFW_FACES = range(0, 200, 20)  # ten of the 200 faces


def _save(folder: Path, kind: str, name: str, array: np.ndarray) -> None:
    (folder / kind).mkdir(parents=True, exist_ok=True)
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
    Image.fromarray(a).save(folder / kind / f"{name}.png")


def _stretched(array: np.ndarray) -> np.ndarray:
    """Any numeric array -> [0, 1] by its own minimum and maximum (NaN -> 0)."""
    a = np.nan_to_num(np.asarray(array, np.float64))
    low, high = float(a.min()), float(a.max())
    return (a - low) / max(high - low, 1e-12)


def _dicom_pixels(path: str) -> np.ndarray:
    """The first frame of a DICOM file as displayable pixels (palette and YBR to RGB)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, convert_color_space

    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        a = apply_color_lut(a, ds)
    elif photometric.startswith("YBR"):
        a = convert_color_space(a, photometric, "RGB")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        a = a[0]
    return _stretched(a)


def assemble_non_chest(folder: Path, seed: int = 0) -> None:
    """Write the non-chest set (see the module docstring) under ``folder/<kind>/``."""
    rng = np.random.default_rng(seed)
    try:
        from skimage import data as skdata
    except ImportError:
        print("scikit-image not installed: no sample photographs/micrographs", file=sys.stderr)
    else:
        for name in SKIMAGE_SAMPLES:
            try:
                img = getattr(skdata, name)()
            except Exception as exc:  # a sample that needs a download
                print(f"skipping skimage {name}: {exc}", file=sys.stderr)
                continue
            if img.dtype == bool:
                img = img.astype(np.uint8) * 255
            _save(folder, "skimage", name, img)
    size = 512
    for value in (0.0, 0.5, 1.0, 0.2):
        _save(folder, "blank", f"constant_{value:g}", np.full((size, size), value))
    _save(folder, "noise", "uniform", rng.random((size, size)))
    _save(folder, "noise", "gaussian", np.clip(rng.normal(0.5, 0.15, (size, size)), 0, 1))
    _save(folder, "noise", "salt_pepper", (rng.random((size, size)) > 0.5).astype(float))
    ramp = np.linspace(0, 1, size)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    _save(folder, "gradient", "horizontal", np.tile(ramp, (size, 1)))
    _save(folder, "gradient", "vertical", np.tile(ramp[:, None], (1, size)))
    _save(folder, "gradient", "radial", np.clip(1 - np.sqrt(xx**2 + yy**2), 0, 1))
    _save(folder, "gradient", "radial_inverse", np.clip(np.sqrt(xx**2 + yy**2) / 1.4, 0, 1))
    for i, (bg, fg) in enumerate(((255, 0), (0, 255), (235, 40))):
        page = Image.new("L", (size, size), bg)
        draw = ImageDraw.Draw(page)
        for line in range(28):
            words = " ".join(["lorem", "ipsum", "dolor", "sit", "amet"][: 2 + (line * 7 + i) % 4])
            draw.text((12, 8 + line * 18), f"{line:02d} {words} {rng.integers(1e6)}", fill=fg)
        _save(folder, "text", f"page_{i}", np.asarray(page))
    for i in range(3):
        shot = Image.new("RGB", (640, 400), (240, 240, 240))
        draw = ImageDraw.Draw(shot)
        draw.rectangle((0, 0, 640, 28), fill=(40, 60, 120))
        draw.text((8, 8), f"PACS viewer - window {i}", fill=(255, 255, 255))
        draw.rectangle((0, 28, 140, 400), fill=(225, 225, 230))
        for j in range(10):
            draw.text((8, 40 + j * 20), f"menu item {j}", fill=(20, 20, 20))
            draw.rectangle((160, 40 + j * 34, 620, 64 + j * 34), outline=(120, 120, 120))
        _save(folder, "screenshot", f"ui_{i}", np.asarray(shot))
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        print("pydicom not installed: no CT/MR/NM/US slices", file=sys.stderr)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on its own odd test files
        for name in PYDICOM_FILES:
            try:
                path = get_testdata_file(name)
                if path is None:
                    raise FileNotFoundError("not among pydicom's test files here")
                _save(folder, "medical", Path(name).stem, _dicom_pixels(str(path)))
            except Exception as exc:  # a codec missing here: skip it and say so
                print(f"skipping pydicom {name}: {exc}", file=sys.stderr)


def assemble_confirmation(folder: Path) -> None:
    """Write the confirmation set (see the module docstring) under ``folder/<kind>/``."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no sample data", file=sys.stderr)
    else:
        data = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
        for kind, name, file in (
            ("photo", "grace_hopper", "grace_hopper.jpg"),
            ("photo", "minduka", "Minduka_Present_Blue_Pack.png"),
            ("graphic", "mpl_logo", "logo2.png"),
        ):
            try:
                with Image.open(data / file) as img:
                    _save(folder, kind, name, np.asarray(img.convert("RGB")))
            except OSError as exc:
                print(f"skipping matplotlib {file}: {exc}", file=sys.stderr)

        def mri() -> np.ndarray:
            with gzip.open(data / "s1045.ima.gz") as fh:
                return np.frombuffer(fh.read(), "<u2").reshape(256, 256)

        def npz(file: str, key: str) -> np.ndarray:
            with np.load(data / file) as archive:
                return np.asarray(archive[key])

        for kind, name, load in (
            ("medical", "mri_s1045", mri),
            ("map", "topobathy", lambda: npz("topobathy.npz", "topo")),
            ("map", "jacksboro_dem", lambda: npz("jacksboro_fault_dem.npz", "elevation")),
            (
                "graphic",
                "bivariate_normal",
                lambda: np.load(data / "axes_grid" / "bivariate_normal.npy"),
            ),
        ):
            try:
                _save(folder, kind, name, _stretched(load()))
            except (OSError, KeyError, ValueError) as exc:
                print(f"skipping matplotlib {name}: {exc}", file=sys.stderr)
    try:
        from skimage.data import lfw_subset
    except ImportError:
        print("scikit-image not installed: no faces", file=sys.stderr)
        return
    faces = lfw_subset()
    for i in LFW_FACES:
        _save(folder, "face", f"lfw_{i:03d}", _stretched(faces[i]))
