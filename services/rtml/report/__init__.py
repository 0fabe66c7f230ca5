"""Plots for people without Grafana: ``rtml bench --plot`` and ``rtml report``.

- :mod:`rtml.report.history`: a cheap sampler that appends the services' ``/metrics`` (only the series the
  report draws) to bounded, rotating JSON-lines files; ``rtml up`` runs one, ``rtml report --record`` too.
- :mod:`rtml.report.series`: pure maths over those snapshots (counter rates with resets, histogram quantiles).
- :mod:`rtml.report.render`: the one-page report (PNG, or HTML with the PNG embedded).
- :mod:`rtml.report.bench_plot`: the figures of one ``rtml bench`` summary.

matplotlib is the optional extra ``rtml[plot]``; it is imported only when a figure is drawn
(:func:`rtml.report.mpl.require_matplotlib` says what to install otherwise).
"""
