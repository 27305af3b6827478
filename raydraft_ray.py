"""`raydraft_ray`, the Ray layer, when raydraft runs from a source tree (a `ray job submit`
working directory, a checkout used without installing): its modules are the files in
actors/. An installed raydraft maps the name to that folder itself (pyproject.toml's
package-dir), so site-packages holds no package with a name as generic as `actors`.
"""

from pathlib import Path

__path__ = [str(Path(__file__).with_name("actors"))]
