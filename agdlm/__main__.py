from agdlm.cli import main

raise SystemExit(main())
