"""ipywidgets controls for the notebook chapters: sliders and dropdowns that redraw one figure in place.

`redraw(draw, **controls)` first shows draw(**defaults) as an ordinary PNG output, so a reader without a
kernel (GitHub, a PDF export, a headless CI run) still sees the default figure, and then the controls. Moving a
control replaces that same output (an IPython display_id), so the cell always holds exactly one figure.
"""
import ipywidgets as W
from IPython.display import Image, display

from .notebook import png

STYLE = {"description_width": "initial"}


def int_slider(description, value, lo, hi, step=1):
    # continuous_update=False: redraw when the slider is released, not on every pixel of the drag
    return W.IntSlider(value=value, min=lo, max=hi, step=step, description=description, style=STYLE,
                       continuous_update=False)


def float_slider(description, value, lo, hi, step=0.1):
    return W.FloatSlider(value=value, min=lo, max=hi, step=step, description=description, style=STYLE,
                         continuous_update=False)


def dropdown(description, options, value=None):
    """options: values, or (label, value) pairs; the first is the default unless `value` says otherwise."""
    options = list(options)
    first = options[0][1] if isinstance(options[0], tuple) else options[0]
    return W.Dropdown(options=options, value=first if value is None else value, description=description, style=STYLE)


def redraw(draw, **controls):
    """Show draw(**values) now (the static default), then the controls; each change redraws in place."""
    values = lambda: {name: c.value for name, c in controls.items()}
    handle = display(Image(png(draw(**values()))), display_id=True)

    def update(_change):
        handle.update(Image(png(draw(**values()))))

    for c in controls.values():
        c.observe(update, names="value")
    display(W.VBox(list(controls.values())))
