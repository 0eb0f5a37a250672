"""Pure OOD maths: densities, scores, input perturbation, attacks, metrics.

No Ray, no files, no training loop, no CLI: tensors in, tensors (or numbers) out.
"""
