"""The prediction layer: what a user will measure, not the roofline.

The roofline (`costmodel/plan.py`'s bound) says how fast a deployment could run; this
package holds what engines achieve against it: efficiency curves derived from measured
per-operation tables, engine profiles, and the CPU side's achieved rates, each with its
source. Data files live beside the code that reads them.
"""
