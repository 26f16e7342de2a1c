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

FINGERPRINT = '1e22d565dd09d9ad91f3fa8efa201273a7e60308b17e498138ed5634e4922986'
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
  'abbeea4024b8a28930cf4161b066e69975a418c2dce47cd52a133e717bd29932',
  'Step 2: Place the blue square in the center.',
  '683e36ab7edcd792428a736fe0ba17a6d98c453cbf59fbaa00a4d9b1af43dadc',
  'Step 3: Place the green triangle at the bottom.',
  'c582fd10eb31f3cf284fae2a733368fad010a5faa1cbd0fb2a84cfa04f85f19f',
  'Your canvas is done.'],
 ['Step 1: Place the yellow circle at the top right.',
  '0de8edc86512b5023fd3472168dcaea205fe7feef0a090c52bf9350acbd69982',
  'Step 2: Remove the red circle.',
  'c8a889cda5a3a9e63c55d9ff5f27c7a3f7f61ec43d1edef34c3670adddee635e',
  'Your canvas is done.'],
 ['Step 1: Place the yellow circle at the top right.',
  'df9941b29c4e666e5d82e1cd241976da013c7cf90235c5f1bd93fae7e9629c9d',
  'Step 2: Remove the red circle.',
  'c6a98c745cc0a7cad9b3f7943255004da4a5e8731b90e45d6cf7b9cf17900ad2',
  'Your canvas is done.'],
 ['Here is your canvas with the blue square made purple.',
  'ef2f40356ce4e34d7d02eadafaeff9adc0218b39f87751a2fb9e25127ed3fb0c'],
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
