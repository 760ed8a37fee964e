from nibblora.tui.cli import main

raise SystemExit(main())
