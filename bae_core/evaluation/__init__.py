"""Evaluation of trained coders: reconstruction and density (`metrics`), spliced fidelity and ablation
(`fidelity`), explain/test windows (`examples`), the lexical judge (`lexical`), scoring a dictionary end to end
(`interp`), the LLM judge (`judge`), aggregation into per-coder numbers (`aggregate`) and sparse probing on
labelled text tasks (`probing`)."""
