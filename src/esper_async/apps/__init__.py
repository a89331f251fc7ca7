"""Applications built on the library: demos, data sets, command-line tools. Only apps may print."""
