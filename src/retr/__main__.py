from retr.cli import main

raise SystemExit(main())
