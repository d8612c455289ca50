"""Speed benchmarks: one MoE layer at real sizes (`layer`), whole-model generation (`generate`),
and the machine's own limits (`machine`) that turn times into fractions of the hardware floor."""
