from skincluster.cli import main

raise SystemExit(main())
