"""The feature explorer: thin ipywidgets views over `clt_lite.features`.

Every callback calls a pure function and renders its result; tests drive the widgets by
setting `.value` and reading the outputs' state.
"""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
from IPython.display import display

from . import features, viz


class _ExplorerView(w.VBox):
    """The explorer's box. Its text repr is what a notebook shows until the cell runs again: JupyterLab 4 does not
    redraw widgets from a notebook's saved widget state (jupyterlab/jupyterlab#15361), so say what to do."""

    def __repr__(self) -> str:  # ipywidgets cuts the text form at 110 characters
        return "[feature explorer: run the notebook's cells (Run > Run All Cells) to use it here]"


class FeatureExplorer:
    """Pick a layer and feature -> top activations, activation over a prompt, decoder norms, steering."""

    def __init__(self, loaded, clt, store, prompt_sample, feature_choices: list[tuple[int, int]] | None = None):
        self.loaded, self.clt, self.store, self.sample = loaded, clt, store, prompt_sample
        n_layers, n_latents = clt.config.n_layers, clt.config.num_latents
        first = feature_choices[0] if feature_choices else (0, 0)
        self.layer = w.BoundedIntText(value=first[0], min=0, max=n_layers - 1, description="layer")
        self.feature = w.BoundedIntText(value=first[1], min=0, max=n_latents - 1, description="feature")
        # The graph's first feature starts selected (an empty first option would show a blank drop-down).
        options = [(f"L{l} #{f}", (l, f)) for l, f in feature_choices or []] or [("no graph features given", None)]
        self.picker = w.Dropdown(options=options, value=options[0][1], description="from graph")
        self.scale = w.FloatSlider(value=1.0, min=-2.0, max=6.0, step=0.5, description="steer x", continuous_update=False)
        self.summary, self.answer = w.HTML(), w.HTML()
        self.plots = w.Output()
        self.picker.observe(self._pick, names="value")
        for control in (self.layer, self.feature):
            control.observe(lambda _: self.refresh(), names="value")
        self.scale.observe(lambda _: self.steer(), names="value")
        self.view = _ExplorerView([w.HBox([self.picker, self.layer, self.feature]), self.summary, self.plots,
                                   w.HBox([self.scale, self.answer])])
        self.refresh()

    def _pick(self, change) -> None:
        if change["new"] is not None:
            layer, feature = change["new"]
            with self.layer.hold_trait_notifications(), self.feature.hold_trait_notifications():
                self.layer.value, self.feature.value = layer, feature

    def refresh(self) -> None:
        """Recompute every view for the current layer and feature."""
        layer, feature = self.layer.value, self.feature.value
        self.top = features.top_activations(self.store, self.clt, layer, feature)
        self.tokens, self.prompt_acts = features.activation_over_prompt(self.loaded, self.clt, self.sample, layer, feature)
        self.profile = features.decoder_norm_profile(self.clt, layer, feature)
        fired = f"max activation {self.top[0].activation:.2f} ({len(self.top)} top rows)" if self.top else "never fires in the store"
        self.summary.value = f"<b>layer {layer}, feature {feature}</b>: {fired}; writes to layers {min(self.profile)}..{max(self.profile)}"
        self.plots.clear_output(wait=True)
        with self.plots:
            fig = viz.feature_card(self.top, [features.store_sample(self.store, t.sample, self.loaded.world) for t in self.top],
                                   self.tokens, self.prompt_acts, self.profile, self.loaded.world)
            display(fig)
        plt.close(fig)  # shown once, inside the Output widget
        self.steer()

    def steer(self) -> None:
        """The model's answer to the prompt with the feature scaled by the slider."""
        self.steered = features.steered_answer(self.loaded, self.clt, self.sample, self.layer.value, self.feature.value, self.scale.value)
        self.answer.value = f"answer with feature x{self.scale.value:g}: <b>{self.steered}</b> (truth: {self.sample.answer})"
