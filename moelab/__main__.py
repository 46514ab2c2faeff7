from moelab.experiments.cli import main

raise SystemExit(main())
