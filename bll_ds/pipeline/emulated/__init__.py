"""The whole pipeline in one process (--emulate): every stage on its own, stepping in the
launched pipeline's order, bit-identical to it."""
