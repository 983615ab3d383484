"""Attribution graphs: from image patches and text tokens, through CLT features, to answer logits.

For one prompt we build the *local replacement model* (Ameisen et al. 2025): the original
forward pass with every MLP output replaced by the CLT's active features' decoder writes plus
an error term (original mlp_out minus those writes), attention patterns and RMSNorm
denominators frozen at their values from the real pass. Given that freezing, the model is
*linear* in its sources (input embeddings, feature activations, error vectors), and it
reproduces the original logits (exactly up to float32 rounding; it computes in float32 even for
bfloat16 models, so there it matches to bfloat16 precision).

The graph's edge source -> target is the source's direct effect on the target through that
frozen model, "direct" meaning not through another feature (feature activations are leaves).
Targets are features (their encoder pre-activation) and the top output logits (demeaned, as in
circuit-tracer). Node order follows circuit-tracer:

    [features (layer, position, latent)] [errors: layer-major, L*S] [embeddings: S] [logits]

and adjacency[target, source]. Linearity gives exact identities the tests check:

    pre-activation(feature) = sum of its incoming edges + b_enc + uncredited
    logit(token) - mean logit = sum of its incoming edges + uncredited   (Llama's attention has no biases)

Edges come from batched backward passes (as circuit-tracer does): the frozen forward runs on a
batch of copies of the prompt, copy b is seeded with target b's read vector, and the gradient at
each write point (layer-0 input, every MLP output) dotted with a source's write vector there is
the edge weight. Feature activations never get gradients: they are leaves, so paths stop at them.

Conventions (local.py): by default circuit-tracer's, so scores mean what circuit-tracer's mean: features and
errors at BOS are zeroed and b_dec stays outside the error nodes (an uncredited constant), and a cap on feature
nodes keeps the features most influential on the logits and drops the rest. Then the identities above hold with
`uncredited(local, graph)` added. `convention="clt-lite"` keeps BOS, puts b_dec in the errors and folds capped
features into them, so the identities hold with no extra term. Prompts without an image are text-only prompts;
images of any size are accepted (the processor resizes them, as LLaVA does); the CLT's skip connection, if any,
stays a live linear path (like attention) rather than part of the error.

Modules, each importing only those listed before it: `local` (the recorded pass, the frozen linear
model), `graph` (AttributionGraph, attribute), `pruning` (influence, prune, scores), `interventions`
(feature ablations in the real model), `ground_truth` (ShapesWorld hit rates), `circuits` (route shares through attention),
`export` (circuit-tracer JSON).
"""

from .circuits import RouteShares, object_positions, route_shares
from .export import export_json, to_circuit_tracer_json
from .graph import AttributionGraph, attribute, target_values, uncredited
from .ground_truth import (
    SINGLE_OBJECT_FAMILIES,
    FamilyHits,
    GroundTruth,
    SampleHit,
    answer_token,
    gradient_x_input,
    ground_truth_hit_rate,
    ground_truth_samples,
    hard_ground_truth_samples,
)
from .interventions import (
    AblationCurve,
    AblationEffects,
    FlipRate,
    Intervention,
    ablation_curve,
    ablation_effects,
    ablation_flip_rate,
    edited_logits,
    feature_activations,
    intervene,
    intervene_many,
    ranked_features,
)
from .local import Frozen, FrozenRun, LocalReplacement, Recorded, encode_recorded, record
from .pruning import GraphScores, Pruned, feature_influence, graph_scores, influence, normalize_rows, patch_influence, prune
