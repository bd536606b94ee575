"""The application floor: the command line, its runner, the demo and the offline model zoo.

``cli`` (the ``optbrain`` command), ``runs`` (one runner for uniform and budget runs), ``text``
(terminal tables), ``demo``, ``zoo/``. Nothing below imports from here.
"""
