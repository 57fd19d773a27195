"""Stage 3: captions -> labelled phrases, and the per-layer analysis of the labels.

labeler = make_labeler("embedded" | "openai")          # once per process (stage.py)
labels = categorize(captions, labeler)                  # list[CaptionLabels], same order
analysis = analyze({layer: labels, ...}, entropies)     # analysis.py
write_report(analysis, out_dir)                         # report.py: csv, figures, summary
"""
