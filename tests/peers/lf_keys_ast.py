"""Keys of an unpacked llamafactory wheel's hparams, read with ast (no install): TSV (file, class, key).

Used for llamafactory-kt 0.9.6.dev0, the registry's closest match to the examples' commit (its
examples use keys 0.9.5 lacks: kt_config, Megatron-Bridge's): `python lf_keys_ast.py DIR`.
"""

import ast
import sys
from pathlib import Path

root = Path(sys.argv[1])
for path in sorted((root / "llamafactory" / "hparams").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and not st.target.id.startswith("_"):
                    print(path.name, node.name, st.target.id, sep="\t")
