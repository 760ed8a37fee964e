from nibblora.prepare.cli import main

raise SystemExit(main())
