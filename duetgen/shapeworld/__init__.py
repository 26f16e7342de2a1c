"""ShapeWorld, the toy world (DESIGN section 9): `world` (scenes, prompts, the renderer, the generator),
`judge` (reading text and canvases back, the exact metrics), `evaluate` (answering through the engine).

Imports run one way: world <- judge <- evaluate. The evaluation harness reaches the judge only through the
`scorer` a benchmark spec names (duetgen/eval/benchmarks/shapeworld.json)."""
