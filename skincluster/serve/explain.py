"""`skincluster explain MODEL IMAGE --out PNG`: where in the image the model looked.

Grad-CAM (Selvaraju et al., 2017): the gradient of the class score with
respect to the last convolutional feature map, averaged over space, weights
that map's channels; their ReLU'd sum is the heatmap. The class score is the
pre-softmax logit (the layer named ``logits`` in every registered model), as
in the paper: the softmax probability saturates near 1 and its gradient
vanishes exactly where the model is most sure.

Which feature map: the last layer, in the model's top-level chain, that is a
convolution or a nested backbone sub-model and outputs a 4-D tensor. For the
CNNs that is ``conv_3`` (25x31 cells at 100x125); for the transfer models it
is the backbone's output, i.e. its last convolutional block after activation
(MobileNet ``conv_pw_13_relu``, ResNet50 ``conv5_block3_out``, DenseNet121
``relu``; 3x3 to 4x4 cells at 100x125, so their maps are coarse).

``nn`` has no convolution at all (it flattens the pixels first). It gets
**input-gradient saliency** instead (Simonyan et al., 2014): the absolute
gradient of the class logit with respect to each pixel, maximum over RGB,
blurred a little so that it reads as regions rather than speckle. The
explanation's ``method`` says which one was used.

The model sees the image decoded and resized exactly as ingest does
(`decode_image`, 125x100). The heatmap is computed on that view and then
stretched back over the original pixels (the inverse of ingest's resize), so
the PNG has **the input image's own size**.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from skincluster import storage
from skincluster.config import CLASS_LONG_NAMES, CLASS_NAMES
from skincluster.data.images import ImageDecodeError, decode_image, to_rgb

#: Weight of the coloured heatmap in the overlay (the rest is the photo).
OVERLAY_ALPHA = 0.45
#: Gaussian blur (sigma) of the saliency fallback, in pixels of the 125x100 view.
SALIENCY_BLUR = 2.0


@dataclass
class Explanation:
    #: The (100, 125, 3) uint8 pixels the model saw.
    image: np.ndarray
    #: (100, 125) float32 in [0, 1], aligned with `image`.
    heatmap: np.ndarray
    class_index: int
    probabilities: np.ndarray
    #: "grad-cam" or "saliency" (models without a convolutional feature map).
    method: str
    #: The feature map Grad-CAM used, e.g. "conv_3" or "mobilenet_1.00_224 (conv_pw_13_relu)".
    layer: str | None

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_index]

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.class_index])


def _chain(model) -> list:
    """The model's top-level layers after the input, in order."""
    import tf_keras as keras

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"explain needs a model with one input and one output; {model.name} has "
                         f"{len(model.inputs)} and {len(model.outputs)}")
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _is_feature_layer(layer) -> bool:
    import tf_keras as keras

    from skincluster.models.registry import AUGMENTATION_LAYER

    conv = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    if isinstance(layer, conv):
        return True
    return isinstance(layer, keras.Model) and layer.name != AUGMENTATION_LAYER


def _describe(layer) -> str:
    import tf_keras as keras

    if isinstance(layer, keras.Model):  # a backbone: name the layer inside it whose map we use
        return f"{layer.name} ({layer.layers[-1].name})"
    return layer.name


def class_index_of(name: str | None) -> int | None:
    if name is None:
        return None
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown class {name!r}; choose one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(name)


def explain(model, image: np.ndarray, class_index: int | None = None) -> Explanation:
    """Heatmap of `model` for `class_index` (default: the predicted class) on one uint8 image."""
    import skincluster  # noqa: F401  (tf-keras before TensorFlow)
    import tensorflow as tf

    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected one (height, width, 3) uint8 image, got {image.dtype} {image.shape}")
    layers = _chain(model)
    # The model's input is uint8 and Keras casts it on the way in, which cuts
    # the gradient; feed float pixels (same values) to the layers after it.
    pixels = tf.constant(image[None].astype(np.float32))
    outputs = []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(pixels)
        x = pixels
        try:
            for layer in layers:
                x = layer(x, training=False)
                outputs.append(x)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            raise ValueError(f"explain runs the model's top-level layers one after the other; {model.name} is not "
                             f"such a chain (an ensemble? explain one member at a time): {exc}") from exc
        probabilities = np.asarray(tf.cast(x, tf.float32))[0]
        expected = np.asarray(model(image[None], training=False), dtype=np.float32)[0]
        if probabilities.shape != expected.shape or not np.allclose(probabilities, expected, atol=1e-4):
            raise ValueError(f"explain runs the model's top-level layers one after the other; {model.name} is not "
                             "such a chain (its layer-by-layer output differs from the model's)")
        index = int(np.argmax(probabilities)) if class_index is None else int(class_index)
        if not 0 <= index < len(probabilities):
            raise ValueError(f"class index {index} out of range for {len(probabilities)} classes")
        names = [layer.name for layer in layers]
        # Logit of the class (pre-softmax); log-probability if a model has no logits layer.
        if "logits" in names:
            score = tf.cast(outputs[names.index("logits")][0, index], tf.float32)
        else:
            score = tf.math.log(tf.cast(x[0, index], tf.float32) + 1e-12)

    feature = next(
        (i for i in range(len(layers) - 1, -1, -1) if outputs[i].shape.rank == 4 and _is_feature_layer(layers[i])),
        None,
    )
    height, width = image.shape[:2]
    if feature is not None:
        maps = tf.cast(outputs[feature], tf.float32)
        grads = tf.cast(tape.gradient(score, outputs[feature]), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel
        cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[0]
        heat = tf.image.resize(cam[..., None], (height, width), method="bilinear")[..., 0].numpy()
        method, layer_name = "grad-cam", _describe(layers[feature])
    else:
        grads = tape.gradient(score, pixels)
        saliency = np.abs(np.asarray(grads, dtype=np.float32)[0]).max(axis=-1)
        heat = _blur(saliency, SALIENCY_BLUR)
        method, layer_name = "saliency", None
    del tape
    heat = np.maximum(np.asarray(heat, dtype=np.float32), 0.0)
    top = float(heat.max())
    # An all-zero map (no positive evidence for the class) stays all zero rather than dividing by 0.
    heat = heat / top if top > 0 else heat
    return Explanation(image=image, heatmap=heat, class_index=index, probabilities=probabilities,
                       method=method, layer=layer_name)


def _blur(values: np.ndarray, sigma: float) -> np.ndarray:
    # scipy comes with scikit-learn, a dependency; Pillow cannot blur float images.
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(values.astype(np.float32), sigma=sigma, mode="nearest")


def overlay(photo: Image.Image, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The heatmap (jet colours) blended over `photo`, stretched to the photo's size."""
    import matplotlib

    width, height = photo.size
    heat = Image.fromarray(heatmap.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    colours = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
    base = np.asarray(photo.convert("RGB"), dtype=np.float32)
    blended = (1.0 - alpha) * base + alpha * colours
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")


def read_image(path: str) -> tuple[np.ndarray, Image.Image]:
    """(the model's 125x100 view as ingest decodes it, the full-size RGB photo); errors name the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder; explain takes one image file") from None
    except OSError as exc:
        raise OSError(f"{path}: cannot read image: {exc.strerror or exc}") from None
    try:
        view = decode_image(data)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from None
    with Image.open(io.BytesIO(data)) as img:  # decodes, since decode_image just did
        photo = to_rgb(img)  # not img.convert: that clips 16-bit images to white
    return view, photo


def explain_file(model, image_path: str, out_png: str, class_name: str | None = None) -> Explanation:
    """Explain one image file and write the overlay PNG (at the image's own size)."""
    view, photo = read_image(image_path)
    result = explain(model, view, class_index_of(class_name))
    folder = os.path.dirname(os.path.abspath(out_png))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{out_png}: folder {folder} does not exist")
    png = io.BytesIO()
    overlay(photo, result.heatmap).save(png, format="PNG")
    storage.write_local_atomic(out_png, png.getvalue())  # a previous overlay stays whole if this one dies
    return result


def format_explanation(result: Explanation, image_path: str, out_png: str) -> str:
    name = result.class_name
    how = f"Grad-CAM on {result.layer}" if result.method == "grad-cam" else (
        "input-gradient saliency (the model has no convolutional feature map)")
    top = ", ".join(f"{CLASS_NAMES[i]} {result.probabilities[i]:.2f}"
                    for i in np.argsort(result.probabilities)[::-1][:3])
    return (f"{image_path}: heatmap for {name} ({CLASS_LONG_NAMES[name]}, p={result.probability:.2f}) by {how}\n"
            f"top classes: {top}\nwrote {out_png}")
