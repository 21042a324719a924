"""Training code for the toy-talker default (reference/toy-talker-plan.md): synthetic talking heads
(synth.py), and the teacher / distillation stages built on the runtime's own model classes.

Kept out of runtime/ on purpose: nothing here is needed to run a stream. Submodules are imported explicitly
(`from train.synth import make_clip`); this file imports nothing, so `import train` costs nothing.
"""
