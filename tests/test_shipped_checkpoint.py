"""The shipped ShapeWorld checkpoint's answers, pinned: a refactor must not change a byte of them.

`duetgen generate` on these prompts with these seeds gave exactly this text and these pixels when the
checkpoint was shipped (the engine, the drawing, the judge's canvas renderer). A change that moves any of
them changes what users get. A re-shipped checkpoint changes its fingerprint: re-pin in the same commit
(`python tests/test_shipped_checkpoint.py` prints the new values).
"""

from __future__ import annotations

import hashlib

import pytest

from duetgen.data.record import TextPart
from duetgen.eval.adapters import model_fingerprint
from duetgen.infer.pipeline import DEFAULT_MODEL_DIR, DuetGenPipeline
from duetgen.shapeworld.world import Piece, Scene, render

FINGERPRINT = 'e09e1fbf0f0f544363301412f8fd53c79fd8b2c9a24c82b94f20c06af28d8be9'
HOWTO = "How do I arrange a red circle at the top left, a blue square in the center and a green triangle at the bottom?"
CONTINUATION = "Here is my canvas. How do I add a yellow circle at the top right, then remove the red circle?"
CASES = [  # (prompt, with the canvas, seed, guidance_scale)
    (HOWTO, False, 0, None),
    (CONTINUATION, True, 2, None),
    (CONTINUATION, True, 2, 2.0),
    ("Make the blue square purple.", True, 3, None),
    ("What is on my canvas?", True, 4, None),
]
EXPECTED = [['Step 1: Place the red circle at the top left.',
     'd8dfdf3c27a56ee3aae5e0e0d13df4ee154facc85972181b406b8decb8feb61e',
     'Step 2: Place the blue square in the center.',
     '1cca2046e93d06120f5f7db299d566283f8f7c02ed48a96fa5e3c7f93316df72',
     'Step 3: Place the green triangle at the bottom.',
     'f6234e7ec423093ed9f1808dd613696940cb76e097b2f067e768218b7afa3408',
     'Your canvas is done.'],
    ['Step 1: Place the yellow circle at the top right.',
     '6c25dd2a4419536e0484cae24c9085672deb70c6c530d6986747995b512da6ca',
     'Step 2: Remove the red circle.',
     '5951569404fedc99253d1d5896b10e7d826110ffeec6e57741a70e7b8d171fa0',
     'Your canvas is done.'],
    ['Step 1: Place the yellow circle at the top right.',
     '1a34fc317e9c899c76af6cb864eeb7790175325a370bf62b54ebee866d9e0d53',
     'Step 2: Remove the red circle.',
     'd182669c7380a18fceee193dab40cea2a25581a3807f15b81fde45e6cd1ada69',
     'Your canvas is done.'],
    ['Here is your canvas with the blue square made purple.',
     '757c3f703f7476a566632257b65b583d6c986bc8edcb1333b072032f200a3257'],
    ['The canvas has a red circle at the top left and a blue square in the center.']]


def canvas():
    return render(Scene.of([Piece("red", "circle", "top left"), Piece("blue", "square", "center")]))


def answers(pipe) -> list[list[str]]:
    """Per case: the answer's text parts and the sha256 of each image's RGB pixels, in order."""
    out = []
    for prompt, with_canvas, seed, guidance in CASES:
        record = pipe(prompt, images=[canvas()] if with_canvas else [], seed=seed, guidance_scale=guidance)
        out.append([p.text if isinstance(p, TextPart) else hashlib.sha256(p.image.tobytes()).hexdigest()
                    for p in record.messages[-1].content])
    return out


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "duetgen.json").is_file(), reason="no ShapeWorld checkpoint shipped")
def test_shipped_checkpoint_answers_are_unchanged():
    fingerprint = model_fingerprint(DEFAULT_MODEL_DIR)
    assert fingerprint == FINGERPRINT, (f"{DEFAULT_MODEL_DIR} was re-shipped (fingerprint {fingerprint}): re-pin "
                                        f"FINGERPRINT and EXPECTED with `python {__file__}`")
    assert answers(DuetGenPipeline.from_pretrained(DEFAULT_MODEL_DIR)) == EXPECTED


if __name__ == "__main__":
    import pprint

    print(f"FINGERPRINT = {model_fingerprint(DEFAULT_MODEL_DIR)!r}")
    print("EXPECTED = ", end="")
    pprint.pprint(answers(DuetGenPipeline.from_pretrained(DEFAULT_MODEL_DIR)), width=120)
