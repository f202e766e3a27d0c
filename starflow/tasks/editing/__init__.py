"""Instruction editing: an editing dataset made from shapes scenes (``starflow.data.edits``), an edit
model that reads the source image as an extra prefix of the deep block, the pipeline that edits a user's
image, and automatic scoring. Training is a recipe like any other: ``starflow train --config
configs/shapes_edit.yaml`` (dataset ``shapes-edit``, model_type ``starflow-edit``).

Dataset
-------
An :class:`EditExample` is (source scene, instruction, target scene), consistent by construction: the target
is :func:`apply_instruction` of the source, which changes exactly one object. Instruction types
(``EDIT_KINDS``) and their templates:

=============  ===================================  ===========================================================
kind           instruction                          target
=============  ===================================  ===========================================================
``recolour``   "make the circle blue"               the (only) circle gets the new colour; nothing else changes
``remove``     "remove the square"                  the (only) square is gone (the scene keeps >= 1 object)
``add``        "add a red triangle"                 a new small/medium object in free space (>= 3 px from all)
``move``       "move the triangle to the left"      the (only) triangle shifts by ``MOVE_PX`` (8 px at 32 px)
               ("to the right", "up", "down")       and stays inside the margins and >= 3 px from the others
=============  ===================================  ===========================================================

"the X" needs exactly one X in the source (else the instruction is ambiguous and is not generated). Example
``i`` of a split is drawn from ``numpy.random.default_rng([seed, i])`` with kinds cycling, so every prefix
of the dataset is balanced and nothing depends on the dataset size.

Scoring
-------
:func:`infer_edit` compares the ShapesEval detections of a source image and an edited image (objects matched
by shape, colour and position within ``tol_px``) and names the one change it sees, or ``None`` when the
difference is not exactly one supported edit. :func:`score_edit` says whether an edited image realises an
example's instruction: the inferred change equals the requested one (``change_ok``) and every other object
is still where it was (``rest_ok``).

Edit model
----------
:class:`EditSTARFlow` is STARFlow whose deep block's prefix is ``[source tokens ; instruction tokens]``:
the source image in the model's space (pixels in [-1, 1] or latents) is patchified like the input, projected
to the width and given its own position embedding. Shallow blocks stay unconditional. The instruction is
dropped to the learned null with ``cond_drop_prob`` (classifier-free guidance on the instruction); the source
is never dropped. :meth:`EditSTARFlow.from_base` starts from a trained text-conditional STARFlow (all its
weights; only the source projection is new), which is the paper's fine-tuning recipe.
"""
from starflow.data.edits import (  # noqa: F401
    DIRECTIONS, EDIT_KINDS, EDIT_SPLIT_SEEDS, EDIT_TEST_SEED, EDIT_TRAIN_SEED,
    EditDataset, EditExample, EditPairs, GRAMMAR, Instruction, MOVE_PX, SOURCE_CATEGORIES, TOL_PX,
    apply_instruction, describe, parse_instruction, sample_edit,
)
from starflow.io.shipped import DEFAULT_EDIT_MODEL  # noqa: F401
from starflow.tasks.editing.scoring import (  # noqa: F401
    infer_edit, score_edit,
)
from starflow.tasks.editing.model import (  # noqa: F401
    EditCondition, EditPipeline, EditSTARFlow, SourcePrefixBlock, save_shipped,
)
