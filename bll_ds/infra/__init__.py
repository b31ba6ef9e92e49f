"""Infrastructure every part uses: errors, atomic writes, storage checks, process groups."""
