from nibblora.verify.cli import main

raise SystemExit(main())
