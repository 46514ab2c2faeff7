"""One module per `moelab` command: each defines HELP, add_arguments(parser) and run(args)."""
